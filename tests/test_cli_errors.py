"""Command-line faults (problems 7, 12-14): each bad input exits with a one-line error naming the fix."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main


def test_train_toy_accepts_out_with_a_space(monkeypatch):
    """Problem 13: `workbench train-toy --out DIR` (the documented form) failed: "expected one argument"."""
    import workbench.toyworld.train as train

    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["train-toy", "--out", "some/dir", "--steps", "3"]) == 0
    assert main(["train-toy", "--out=some/dir"]) == 0
    assert seen == [["--out", "some/dir", "--steps", "3"], ["--out=some/dir"]]


@pytest.mark.parametrize("command", [["sweep", "--limit", "-5"], ["reproduce", "-n", "-1"]])
def test_negative_counts_are_refused(command, capsys, tmp_path):
    """Problem 7: `--limit -5` ran all but the last 5 facts."""
    with pytest.raises(SystemExit) as info:  # refused while parsing, before any model is looked for
        main([*command, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")])
    assert info.value.code == 2 and "must be >= 0" in capsys.readouterr().err


def test_out_naming_a_file_is_a_clear_error(tmp_path, capsys):
    """Problem 14: `--out` pointing at a file gave a FileExistsError traceback."""
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    rc = main(["sweep", "--device", "cpu", "--limit", "1", "--samples", "2", "--kinds", "hidden", "--no-progress",
               "--out", str(target)])
    assert rc == 1 and "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_edit_with_missing_corpus_or_bad_template(tmp_path, capsys):
    """Problem 14: `edit --corpus /no/such/file` said the hub was unreachable; an extra {name}
    placeholder gave a KeyError traceback."""
    base = ["edit", "--device", "cpu", "--subject", "Varo Keltin", "--new-object", "Tuvan"]
    rc = main([*base, "--prompt", "{} was born in", "--corpus", str(tmp_path / "no" / "such" / "file.txt"),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1 and "corpus file" in err and "does not exist" in err and "unreachable" not in err
    rc = main([*base, "--prompt", "The {relation} of {} is"])
    assert rc == 1 and "placeholder {relation}" in capsys.readouterr().err


def test_reproduce_takes_a_corpus(tmp_path, monkeypatch):
    """Problem 14: `reproduce` had no --corpus, so ROME rows offline on a local folder all failed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Varo Keltin {i} was born in Osla and speaks Tuvan." for i in range(200)))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(["reproduce", "--device", "cpu", "-n", "1", "--methods", "rome", "--loci", "subject", "--corpus",
               str(corpus), "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    rome_row = next(r for r in rows if r["method"] == "rome")
    assert rome_row["error"] is None
    key = json.loads((out / "config.json").read_text())["key"]
    assert key["methods"]["rome"]["hparams"]["mom2_dataset"] == str(corpus)
    assert main(["reproduce", "--device", "cpu", "--corpus", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "r2"), "--methods", "rome"]) == 1
