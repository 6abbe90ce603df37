"""A bundle summarised for people: what it holds, how it was made, how good it measured (`jishi info`)."""

from __future__ import annotations

from jishi.runtime.settings import for_this_machine


_FORMAT_KEYS = ("formats", "forms", "requantized")


def _formats(q: dict) -> list[tuple[str, str]]:
    """A GGUF base's tensor types per group, how each is stored, and what was re-quantized."""
    rows = []
    for group, counts in (q.get("formats") or {}).items():
        rows.append((f"  {group}", ", ".join(f"{t} x{n}" for t, n in counts.items())))
    if rows:
        rows.insert(0, ("tensor formats", "(GGUF type x tensors, per group)"))
    for t, form in (q.get("forms") or {}).items():
        rows.append((f"  {t}", f"kept as {form}"))
    for group, counts in (q.get("requantized") or {}).items():
        rows.append((f"  re-quantized", f"{group}: " + ", ".join(f"{t} x{n}" for t, n in counts.items())))
    return rows


def describe(bundle) -> str:
    m = bundle.manifest
    c = m.config
    q = m.graph.quantization
    rows = [
        ("name", m.name),
        ("path", str(bundle.root)),
        ("format", f"{m.format} v{m.format_version}"),
        ("size", f"{bundle.size / 1e6:.1f} MB in {len(m.files)} files"),
        ("model", f"{c.family}, {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads "
                  f"({c.num_kv_heads} KV), vocab {c.vocab_size}"),
        ("quantization", ", ".join(f"{k}={v}" for k, v in q.items() if k not in _FORMAT_KEYS)),
        ("context", f"{c.context_length} tokens"),
        ("base", f"{m.provenance.get('base')} ({m.provenance.get('base_source')}, sha256 "
                 f"{(m.provenance.get('base_sha256') or '-')[:12]})"),
        ("licence", m.provenance.get("base_license") or "not recorded (see the base model's own terms)"),
        ("template", "yes" + (" (given at build)" if m.provenance.get("chat_template") else "")
         if m.tokenizer.chat_template else "none: a pretrained base; send plain prompts or give one with --chat-template FILE"),
        ("signed", "yes" if bundle.signed else "no"),
        ("merge points", (f"{', '.join(m.merge_points['targets'])}, any rank"
                          + (f" (in {m.merge_points['graph']}, opened when an adapter is used)" if m.merge_points.get("graph") else ""))
                         if m.merge_points else "none (built with --no-merge-points)"),
        ("adapters", ", ".join(a["name"] + (" (delivered)" if a.get("delivered") else "") for a in m.adapters) or "none"),
    ]
    rows += _formats(q)
    d = m.provenance.get("distilled")
    if d:
        teacher, plan = d.get("teacher") or {}, d.get("plan") or {}
        rows.append(("distilled", f"from {teacher.get('name', '?')}: {len(plan.get('layers', []))} of {teacher.get('layers', '?')} "
                                  f"blocks, {d.get('steps')} steps on {d.get('tokens') or 0:,} tokens"
                                  + (", int4-aware (QAT)" if d.get("qat") else "")))
    s = for_this_machine()
    rows.append(("runtime here", f"{s.threads} threads, {' > '.join(s.providers)}, arena {'on' if s.cpu_mem_arena else 'off'}, "
                                 f"prepacking {'on' if s.prepacking else 'off'}, spinning {'on' if s.spinning else 'off'} "
                                 f"({'profile ' + s.profile if s.profile else 'defaults'})"))
    ev = m.evaluation
    if ev:
        rows.append(("quality", f"perplexity {ev['perplexity']:.2f} (reference {ev['reference_perplexity']:.2f}, "
                                f"{100 * (ev['perplexity'] / ev['reference_perplexity'] - 1):+.1f}%), "
                                f"top-1 agreement {100 * ev['top1_agreement']:.1f}%"))
        rows.append(("measured on", ev["heldout"]))
        vt = ev.get("teacher")
        if vt:
            rows.append(("vs teacher", f"{vt['name']}: perplexity {vt['student_perplexity']:.2f} against its "
                                       f"{vt['perplexity']:.2f} ({vt['student_perplexity'] / vt['perplexity']:.2f}x), top-1 "
                                       f"agreement {100 * vt['top1_agreement']:.1f}%, KL {vt['kl']:.3f} nats/token"))
        mg = ev.get("merged")
        if mg:
            rows.append(("merged", f"adapter {m.provenance.get('merged_adapter', {}).get('name')} folded into the weights; "
                                   + ", ".join(f"{q} perplexity {mg[q]['perplexity']:.2f} ({100 * mg[q]['loss']:+.1f}%, "
                                               f"{mg[q]['size_mb']:.0f} MB)" for q in ("int4", "int8"))))
            rebuild = "" if mg["recommended"] == q.get("name") else f" (rebuild with --quant {mg['recommended']})"
            rows.append(("recommended", f"{mg['recommended']}{rebuild}: {mg['reason']}"))
    else:
        rows.append(("quality", "not measured (built with --no-eval)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("files:")
    fw = max(len(n) for n in m.files)
    for n, f in m.files.items():
        lines.append(f"  {n:<{fw}}  {f.size / 1e6:9.2f} MB  sha256 {f.sha256[:16]}")
    return "\n".join(lines)
