from benchmarks.report import SECTION_BEGIN, SECTION_END, format_table, update_results_md


def test_results_section_is_replaced_and_other_sections_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Kernels\nkernel figures\n")
    update_results_md(path, "## Issue 6\nfirst run")
    update_results_md(path, "## Issue 6\nsecond run")
    path.write_text(path.read_text() + "\n## Engine\nengine figures\n")
    update_results_md(path, "## Issue 6\nthird run")
    text = path.read_text()
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1
    assert "third run" in text and "first run" not in text and "second run" not in text
    assert "kernel figures" in text and "engine figures" in text


def test_table_aligns_columns_and_formats_numbers():
    table = format_table(["system", "tokens/s"], [["openlora", 1234.567], ["peft", 3.14159], ["x", None]])
    lines = table.splitlines()
    assert lines[0] == "| system   | tokens/s |"
    assert "1,234.6" in lines[2] and "3.14" in lines[3] and "n/a" in lines[4]
    assert len({len(line) for line in lines}) == 1
