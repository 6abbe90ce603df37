"""The command line as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys



def jishi(*args, timeout=600, input=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env=env)


def test_build_run_info_from_a_hugging_face_directory(tiny_dirs, tmp_path):
    out = tmp_path / "qwen-int4"
    done = jishi("build", "--base", str(tiny_dirs["qwen2"]), "--quant", "int4", "--context", "128", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "Measuring quality on held-out text" in done.stderr  # progress is shown

    info = jishi("info", str(out))
    assert info.returncode == 0, info.stderr
    for expected in ("quantization  name=int4", "context       128 tokens", "perplexity", "model.onnx.data"):
        assert expected in info.stdout

    run = jishi("run", str(out), "Hello", "--temperature", "0", "--max-tokens", "5")
    assert run.returncode == 0, run.stderr
    import jishi as api

    expected = api.load(out).chat([{"role": "user", "content": "Hello"}], max_new_tokens=5, temperature=0).text
    assert run.stdout == expected + "\n"


def test_chat_in_the_terminal(tiny_bundles):
    done = jishi("chat", str(tiny_bundles["fp32"]), "--temperature", "0", "--max-tokens", "4",
                 input="Hello\n/reset\nAgain\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert "(conversation cleared)" in done.stderr
    # four prompts shown; an answer (one line) after each message, none after the commands
    assert done.stdout.startswith("> ") and done.stdout.count("> ") == 4
    answers = [part for part in done.stdout.split("> ") if part]
    assert len(answers) == 2 and all(a.endswith("\n") and len(a) > 1 for a in answers)


def test_errors_are_one_line_without_traceback(tmp_path):
    done = jishi("run", str(tmp_path / "missing"), "hi")
    assert done.returncode == 1
    assert done.stderr.startswith("jishi: error: no bundle") and "Traceback" not in done.stderr
    done = jishi("build", "--base", "no-such-model")
    assert done.returncode == 1
    assert "is neither a path that exists nor a known name (smollm2-135m-instruct, gemma3-270m)" in done.stderr


def test_version():
    done = jishi("--version")
    assert done.returncode == 0 and done.stdout.startswith("jishi 0.")


def test_build_for_a_device_uses_the_plan(tiny_dirs, tmp_path):
    out = tmp_path / "planned"
    done = jishi("build", "--base", str(tiny_dirs["llama"]), "--device", "rpi4-4gb", "--context", "128", "--no-eval", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "plan for rpi4-4gb: int4: fits" in done.stderr
    info = jishi("info", str(out))
    assert "quantization  name=int4" in info.stdout
    plan = jishi("plan", str(out), "--device", "rpi5-8gb")
    assert plan.returncode == 0 and "recommended: int4" in plan.stdout and "fp32" in plan.stdout
