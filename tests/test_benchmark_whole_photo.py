"""``python -m benchmarks.whole_photo`` on its 1024-px one-face photo with the identity restorer."""


def test_whole_photo_benchmark_identity(capsys):
    from benchmarks import whole_photo

    out = whole_photo.main(
        ["--methods=identity", "--config=tiny", "--repeats=1", "--warmup=0", "--photos=1face"]
    )
    text = capsys.readouterr().out
    assert "WARNING" not in text
    (row,) = out["rows"]
    assert (row["photo"], row["method"], row["size"]) == ("1face", "identity", 512)
    assert row["faces"] == row["expected"] == 1  # detection found the astronaut
    parts = [row[f"{k}_s"] for k in whole_photo.PARTS]
    assert all(t >= 0 for t in parts) and row["detect_s"] > 0
    assert sum(parts) <= row["total_s"] * 1.001 and row["photos_per_s"] == 1 / row["total_s"]
    assert out["memory"] == [] and [c["batch"] for c in out["compile"]] == [1]
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| photo | pixels | faces | method | config | S | detect ms |")
    assert table[2].startswith("| 1face | 1024x1024 | 1/1 | identity | tiny | 512 |")
    assert len(table) == 3 + 3  # photo table (header, rule, one row), compile table
    assert "command: python -m benchmarks.whole_photo --methods=identity" in text
