"""How the runtime sets up onnxruntime on this device: threads, execution provider, memory.

The choice comes from the device profile that matches the machine best
(``devices.detect.best_profile``); each profile's ``[runtime]`` table holds its values and
why (``devices/profiles/*.toml``). What each knob is in onnxruntime 1.32:

- threads: ``SessionOptions.intra_op_num_threads`` (one pool; the graph runs sequentially).
  The profile's count (its performance cores), never more than the physical cores this
  process may use; ``jishi.load(..., threads=N)`` overrides it.
- CPU memory arena: ``SessionOptions.enable_cpu_mem_arena``. With it onnxruntime keeps
  freed scratch in a growing pool; without it scratch goes back to the system allocator.
- prepacking: the session config key ``session.disable_prepacking``. With it, MatMulNBits
  and the other kernels repack their constant weights at load into the layout they run
  fastest on (a second copy of the weights, built once). Without it int4 MatMulNBits also
  leaves its int8-activation kernels for an fp32 path: 40x slower decode and other logits.
- spinning: ``session.intra_op.allow_spinning``. Worker threads busy-wait between the many
  small operators of a decode step; on a board that also runs a desktop, or on a shared
  machine, turning it off gives the cores back at some cost in speed.
- memory-mapped weights: not a session option in 1.32. onnxruntime maps external
  initializers from the data file instead of reading them into its own buffers when their
  offsets are page aligned. Measured with a page-aligned copy of the default int4 bundle
  (bench/runtime_settings.py): the same RSS after load and at the peak, because prepacking
  builds its own copy of every MatMulNBits weight either way; so the bundle writer keeps
  packing weights back to back, and no profile asks for it. onnxruntime maps the external
  weights either way, and the pages prepacking read stay resident: ``release_mapped_weights``
  pages them out once the session is made (runtime/memory.py; 300 → 274 MB on the default bundle).
- execution provider: the CPU provider everywhere, unless the profile names a GPU provider
  (the Jetson profile: CUDA) and this onnxruntime has it, then that first and the CPU one
  behind it. The KV cache, the decode-step buffers and the logits stay numpy arrays in host
  memory, bound with IO binding as CPU tensors: on a GPU provider onnxruntime copies them to
  the device and back on every step. Binding them as device tensors is not done (the unified
  memory of a Jetson makes the copies cheaper than on a discrete GPU, not free), and no GPU
  run has been measured.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeSettings:
    threads: int
    providers: tuple[str, ...] = (CPU,)
    cpu_mem_arena: bool = True
    prepacking: bool = True
    spinning: bool = True
    release_mapped_weights: bool = True  # page out the weights file's pages once the session is made (memory.py)
    profile: str | None = None  # the profile they come from
    why: str = ""

    def session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = self.cpu_mem_arena
        so.add_session_config_entry("session.disable_prepacking", "0" if self.prepacking else "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return so

    def describe(self) -> list[tuple[str, str]]:
        return [
            ("threads", str(self.threads)),
            ("execution provider", " > ".join(self.providers)),
            ("CPU memory arena", "on" if self.cpu_mem_arena else "off"),
            ("prepacked weights", "on" if self.prepacking else "off"),
            ("thread spinning", "on" if self.spinning else "off"),
            ("weights file pages", "given back after load" if self.release_mapped_weights else "kept"),
            ("settings from", f"profile {self.profile}" if self.profile else "defaults (no profile matches)"),
        ]


def choose(profile, cores: int, threads: int | None = None, available: list[str] | None = None) -> RuntimeSettings:
    """The settings for a device ``profile`` (or None) on a machine with ``cores`` usable physical
    cores, given the execution providers this onnxruntime has (``available``)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if threads is not None and threads < 1:
        from jishi.errors import JishiError

        raise JishiError(f"threads must be at least 1, got {threads}")
    if profile is None:
        return RuntimeSettings(threads=threads or cores)
    rt = dict(profile.runtime)
    wanted = min(int(rt.get("threads", profile.cores)), cores)
    ep = profile.execution_provider
    providers = (ep, CPU) if ep != CPU and ep in available else (CPU,)
    return RuntimeSettings(
        threads=threads or max(1, wanted),
        providers=providers,
        cpu_mem_arena=bool(rt.get("cpu_mem_arena", True)),
        prepacking=bool(rt.get("prepacking", True)),
        spinning=bool(rt.get("spinning", True)),
        release_mapped_weights=bool(rt.get("release_mapped_weights", True)),
        profile=profile.id,
        why=str(rt.get("why", "")),
    )


def for_this_machine(threads: int | None = None) -> RuntimeSettings:
    from jishi.devices.detect import best_profile, detect

    machine = detect()
    return choose(best_profile(machine), machine.cores, threads)
