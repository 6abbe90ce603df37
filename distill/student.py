"""``jishi distill``: prune a teacher into a student, distil it, save it as a Hugging Face directory.

The output directory holds safetensors weights, config.json, the tokenizer and the chat
template (what ``jishi build --base DIR`` reads) and ``jishi_distill.json``: the teacher,
the blocks kept and why, the data, the training settings and the held-out KL and NLL
before and after. Checkpoints and caches live in ``DIR.work/`` so that ``--resume``
continues an interrupted run; the output appears only when the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from jishi.errors import JishiError
from jishi.runtime.store import swap_in

RECORD = "jishi_distill.json"


@dataclass
class DistillOptions:
    layers: int | None = None
    keep_ratio: float | None = None
    width_ratio: float | None = None
    head_ratio: float | None = None  # fraction of the query heads kept in every block
    method: str = "influence"
    data: tuple[str, ...] = ()
    generated_prompts: int | None = None  # how many built-in prompts the teacher answers (default all)
    generated_tokens: int = 192
    calibration_sequences: int = 4
    init: str | None = None  # start from this student (written by distill) instead of pruning the teacher again
    resume: bool = False
    threads: int | None = None


def work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".work")


def distill(base, output: str | Path, options: DistillOptions, config=None, quiet: bool = False,
            stop_after: int | None = None) -> Path | None:
    """Build and train a student of ``base``; returns ``output`` (None on a rank other than 0,
    or when ``stop_after`` ended the run early)."""
    import torch

    from jishi.distill.base import LoadedBase, load_base
    from jishi.distill.data import chunk, read_documents, teacher_documents
    from jishi.distill.kd import KDConfig, heldout_kl_nll, init_distributed_from_env, snap_to_grid, train
    from jishi.distill.prune import (StudentPlan, build_student, calibration_batches, describe_plan,
                                     non_embedding_params, plan_student)
    from jishi.heldout import heldout_text, windows

    config = config or KDConfig()
    output = Path(output)
    _check_output(output)
    joined = init_distributed_from_env()
    dist, rank = _rank()
    say = (lambda *a: None) if quiet or rank else (lambda *a: print(*a, file=sys.stderr))
    if options.threads:
        torch.set_num_threads(options.threads)
    work = work_dir(output)
    try:
        loaded = base if isinstance(base, LoadedBase) else load_base(base)
        teacher = loaded.model
        tok = loaded.runtime_tokenizer()
        total = teacher.config.num_hidden_layers

        plan_file = work / "plan.json"
        if options.init:
            plan, start = _plan_of_student(options.init, loaded)
        elif options.resume and plan_file.is_file():
            plan = StudentPlan.from_dict(json.loads(plan_file.read_text()))
        else:
            calib = calibration_batches(tok, options.calibration_sequences, min(config.seq_len, 512))
            plan = plan_student(teacher, calib, options.layers, options.keep_ratio, options.width_ratio, options.method,
                                options.head_ratio)
            if rank == 0:
                work.mkdir(parents=True, exist_ok=True)
                _write_json(plan_file, {**plan.as_dict(), **plan.selections()})
        say(describe_plan(plan, total) + (f", starting from {options.init}" if options.init else ""))
        student = start if options.init else build_student(teacher, plan)

        # Data: the user's files and/or the teacher's own answers (written on rank 0, cached, read by all).
        docs, data_desc = [], {}
        if options.data:
            docs = read_documents(options.data, tok)
            data_desc["files"] = [Path(f).name for f in options.data]
        if not options.data or options.generated_prompts:
            if rank == 0:
                teacher_documents(loaded, options.generated_prompts, options.generated_tokens, quiet=quiet,
                                  seed=config.seed)
            if dist:
                dist.barrier()
            generated = teacher_documents(loaded, options.generated_prompts, options.generated_tokens, quiet=True,
                                          seed=config.seed)
            docs += generated
            data_desc.update(generated=len(generated), max_new_tokens=options.generated_tokens)
        sep = loaded.eos_token_ids[0] if loaded.eos_token_ids else None
        seqs, real = chunk(docs, config.seq_len, sep)
        data_desc["sequences"] = len(seqs)
        data_desc["tokens"] = len(seqs) * config.seq_len
        held = windows(tok.encode(heldout_text(), bos=False), config.seq_len)[:config.eval_windows]
        say(f"{len(seqs)} training sequences of {config.seq_len} tokens; {config.steps} steps of {config.batch_size}")

        before = heldout_kl_nll(teacher, student, held) if rank == 0 and held else None
        result = train(teacher, student, seqs, real, config, work, layer_map=list(plan.layers), eval_windows=held,
                       resume=options.resume, stop_after=stop_after, quiet=quiet)
        if result.steps < config.steps:
            return None
        if config.qat_bits:
            snap_to_grid(student, config.qat_bits, config.qat_block)
        if rank != 0:
            dist.barrier()
            return None
        after = heldout_kl_nll(teacher, student, held) if held else None
        record = {
            "teacher": {"name": loaded.name, "source": Path(loaded.source).name, "path": str(Path(loaded.source).resolve()),
                        "sha256": loaded.source_sha256,
                        "layers": total, "non_embedding_params": non_embedding_params(teacher)},
            "student": {"layers": len(plan.layers), "non_embedding_params": non_embedding_params(student)},
            "plan": plan.as_dict(),
            **({"init": {"from": Path(options.init).name, "record": read_record(Path(options.init))}} if options.init else {}),
            "data": data_desc,
            "training": {**asdict(config), "steps_done": result.steps, "tokens": result.tokens,
                         "seconds_this_run": round(result.seconds, 1), "processes": _world()},
            "qat": {"bits": config.qat_bits, "block": config.qat_block, "on_grid": True} if config.qat_bits else None,
            "heldout": {"text": f"pydoc_data.topics, first 20000 characters, {len(held)} windows of {config.seq_len}",
                        "before": _pair(before), "after": _pair(after)},
            "evals": result.evals,
            "history": result.history,
        }
        save_student(student, loaded, output, record)
        if before and after:
            say(f"Held-out KL to the teacher {before[0]:.4f} → {after[0]:.4f}; NLL {before[1]:.3f} → {after[1]:.3f}")
        if dist:
            dist.barrier()
        return output
    finally:
        if joined:
            import torch.distributed as td

            td.destroy_process_group()


def _plan_of_student(path, teacher):
    """The plan recorded by a student directory, and its model (to continue training it against ``teacher``,
    a LoadedBase, which must be the kind it was distilled from: as many layers, the same tokenizer)."""
    from jishi.distill.base import load_base, tokenizer_difference
    from jishi.distill.prune import StudentPlan

    teacher_layers = teacher.model.config.num_hidden_layers
    rec = read_record(Path(path))
    if rec is None:
        raise JishiError(f"{path} is not a student written by jishi distill (no {RECORD}); pass --layers instead of --init")
    if rec["teacher"]["layers"] != teacher_layers:
        raise JishiError(f"{path} was distilled from a teacher with {rec['teacher']['layers']} layers, not this one "
                         f"({teacher_layers}); pass its teacher as --base")
    student = load_base(str(path))
    mine, theirs = student.model.config.vocab_size, teacher.model.config.vocab_size
    why = (f"a vocabulary of {mine:,} tokens against {theirs:,}" if mine != theirs
           else tokenizer_difference(student.tokenizer, teacher.tokenizer))
    if why:
        from jishi.errors import BaseModelError

        raise BaseModelError(f"{path} does not share the teacher {teacher.name}'s tokenizer ({why}): distillation "
                             "matches them token by token, so pass the teacher it was distilled from as --base")
    return StudentPlan.from_dict(rec["plan"]), student.model


def _rank():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank()
    return None, 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _pair(p):
    return None if p is None else {"kl": round(p[0], 5), "nll": round(p[1], 5)}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_student(student, loaded, output: Path, record: dict | None) -> Path:
    """Write ``student`` with the teacher's tokenizer and chat template as a Hugging Face directory,
    atomically (a staging directory renamed into place)."""
    output = Path(output)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        student.generation_config.eos_token_id = loaded.eos_token_ids or student.generation_config.eos_token_id
        student.save_pretrained(str(staging), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(staging))
        # The tokenizer exactly as the teacher's bundle uses it: no special tokens added on encode,
        # BOS only if the teacher adds one (a GGUF-converted tokenizer may claim otherwise).
        (staging / "tokenizer.json").write_text(loaded.tokenizer_json, encoding="utf-8")
        cfg_path = staging / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tcfg["add_bos_token"] = bool(loaded.add_bos)
        tcfg["add_eos_token"] = False
        if loaded.eos_token_ids:  # the end token the teacher's bundle uses (a GGUF conversion may name another)
            eos = loaded.tokenizer.convert_ids_to_tokens(loaded.eos_token_ids[0])
            tcfg["eos_token"] = eos
            special = staging / "special_tokens_map.json"
            if special.is_file():
                smap = json.loads(special.read_text())
                smap["eos_token"] = eos
                special.write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
        if loaded.chat_template:
            tcfg["chat_template"] = loaded.chat_template
        cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
        if record is not None:
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        swap_in(staging, output)  # an older one goes only once this is in place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _check_output(output: Path) -> None:
    """Refuse to replace a directory that is not a student: it may hold someone's work."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / RECORD).is_file())):
        raise JishiError(f"{output} exists and is not a student directory written by jishi distill; choose another output")


def read_record(model_dir: Path) -> dict | None:
    path = Path(model_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None

