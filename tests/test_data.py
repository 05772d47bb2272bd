"""Text sources from local files, the named-corpus path with an injected loader, and sampling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fixture_data
from lwq.calib.data import NAMED_SOURCES, _load_named, load_text, sample_windows
from lwq.errors import BadInput, LwqError


def test_txt_jsonl_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_text("gamma")
    assert load_text(str(tmp_path / "a.txt")) == "alpha beta"
    assert load_text(str(tmp_path)) == "alpha beta\n\ngamma"
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert load_text(str(j)) == "one\n\ntwo"
    j.write_text('{"body": "x"}\n')
    assert load_text(str(j), text_field="body") == "x"
    with pytest.raises(BadInput, match="no string field 'text'"):
        load_text(str(j))
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(BadInput, match=":2: invalid JSON"):
        load_text(str(j))


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such text source"):
        load_text("nosuchcorpus")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BadInput, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(BadInput, match="no .txt files"):
        load_text(str(tmp_path / "sub"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(BadInput, match="cannot read"):
        load_text(str(tmp_path / "bin.txt"))


def test_named_source_uses_datasets_arguments() -> None:
    calls = []

    def fake_loader(path: str, config: str | None, split: str, **kw: object) -> dict[str, list[str]]:
        calls.append((path, config, split, kw))
        return {"text": ["first", "second"]}

    assert _load_named(NAMED_SOURCES["wikitext2"], "eval", fake_loader) == "first\n\nsecond"
    assert calls[-1][:3] == ("wikitext", "wikitext-2-raw-v1", "test")
    _load_named(NAMED_SOURCES["c4"], "calib", fake_loader)
    assert calls[-1][2] == "train" and "data_files" in calls[-1][3]


def test_named_source_offline_is_one_clear_error() -> None:
    def offline(*a: object, **k: object) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    with pytest.raises(LwqError, match="offline"):
        _load_named(NAMED_SOURCES["ptb"], "eval", offline)


def test_local_wikitext_file_loads() -> None:
    text = load_text(str(fixture_data("wikitext-2/test.txt")))
    assert "<unk>" in text and len(text) > 100_000


def test_sample_windows_are_seeded_and_in_range() -> None:
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 8, 64, seed=3), sample_windows(ids, 8, 64, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert not torch.equal(a, sample_windows(ids, 8, 64, seed=4))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous windows of the stream
    with pytest.raises(BadInput):
        sample_windows(ids, 0, 64)
    with pytest.raises(BadInput, match="fewer than one window"):
        sample_windows(ids, 1, 2000)
