"""A bundle summarised for people: what it holds, how it was made, how good it measured (`jishi info`)."""

from __future__ import annotations

from jishi.runtime.settings import for_this_machine


_FORMAT_KEYS = ("formats", "forms", "requantized", "method_reason", "calibration")  # shown on rows of their own


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
        ("architecture", architecture(c)),
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
    if q.get("method_reason"):
        rows.append(("codes", f"{q.get('method')}: {q['method_reason']}"))
    cal = q.get("calibration")
    if cal:
        rows.append(("calibrated on", cal.get("text", "?")))
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
        check = ev.get("int4_check")
        if check and not check.get("within", True):
            bound = f"+{100 * (check['bound'] - 1):.0f}%"
            if check.get("recovered_within"):
                rows.append(("int4", f"costs more than {bound} perplexity without its LoRA, "
                                     f"{100 * (check['recovered_ratio'] - 1):+.1f}% with it: use --adapter "
                                     f"{ev['recovered']['adapter']}"))
            else:
                rows.append(("warning", f"int4 costs more than {bound} perplexity here: {check['advice']}"))
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


def architecture(c) -> str:
    """The graph's features in words (the manifest's ``config.features``)."""
    f = c.features or {}
    parts = [c.model_type or c.family]
    parts.append("RMSNorm (1 + w)" if f.get("norm_offset") else "RMSNorm")
    if f.get("post_attention_norm"):
        parts.append("sandwich norms")
    if f.get("qk_norm"):
        parts.append("QK-norm")
    if c.attention_bias:
        parts.append("q/k/v bias")
    parts.append({"gelu_tanh": "GeGLU", "silu": "SwiGLU"}.get(f.get("activation", "silu"), f.get("activation")))
    if f.get("rotary_dim"):
        parts.append(f"rotary on {f['rotary_dim']} of {c.head_dim} dims")
    if c.rope_scaling:
        parts.append(f"rope {c.rope_scaling.get('rope_type', c.rope_scaling.get('type'))}")
    windows = f.get("layer_windows") or ([c.sliding_window] * c.num_layers if c.sliding_window else [])
    local = [w for w in windows if w]
    if local:
        base = f", rope base {f['local_rope_theta']:g}" if f.get("local_rope_theta") else ""
        parts.append(f"sliding window {max(local)} on {len(local)} of {c.num_layers} layers{base}")
    if f.get("embedding_scale", 1.0) != 1.0:
        parts.append(f"embeddings x{f['embedding_scale']:.4g}")
    if f.get("final_logit_softcap"):
        parts.append(f"logit softcap {f['final_logit_softcap']:g}")
    parts.append("tied head" if c.tie_word_embeddings else "separate head")
    return ", ".join(parts)
