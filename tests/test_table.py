"""Tables for papers (analysis/table.py): the pivot of a summary.csv, its three formats, escaping
and significant digits, round trips, one-line errors; and, where pdflatex is installed, that the
LaTeX compiles."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest

from analysis.table import latex_escape, main

NAN = float("nan")


@pytest.fixture
def summary(tmp_path):
    """A 2 x 3 grid of beta x rho at two step sizes, with one threshold never crossed and one run
    still running; values spanning decades."""
    rows = []
    for h in (1e-3, 1e-2):
        for beta in (0.5, 0.9):
            for rho in (0.9, 0.99, 0.999):
                rows.append(dict(run_id=f"{h}-{beta}-{rho}", h=h, beta=beta, rho=rho, state="completed",
                                 at_loss_0_01_x=1.23456e-5 * beta * rho / h, at_loss_0_01_step=int(1000 * rho),
                                 hill_height=beta + rho))
    df = pd.DataFrame(rows)
    df.loc[(df.h == 1e-3) & (df.beta == 0.9) & (df.rho == 0.99), "at_loss_0_01_x"] = NAN
    df.loc[(df.h == 1e-3) & (df.beta == 0.5) & (df.rho == 0.999), "state"] = "running"
    df = df.rename(columns={"at_loss_0_01_x": "at_loss_0.01_pert_norm", "at_loss_0_01_step": "at_loss_0.01_step"})
    df.to_csv(tmp_path / "summary.csv", index=False)
    return tmp_path, df


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_markdown_and_csv_hold_the_summary_values_to_the_digits_asked(summary, capsys):
    folder, df = summary
    code, out, _ = run(capsys, str(folder), "--rows", "beta", "--cols", "rho", "--value", "at_loss_0.01_pert_norm",
                       "--where", "h=0.01", "--fmt", ".3g", "--csv")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "beta\\rho,0.9,0.99,0.999"
    for line in lines[1:]:
        beta, *cells = line.split(",")
        for rho, cell in zip((0.9, 0.99, 0.999), cells):
            want = df[(df.h == 1e-2) & (df.beta == float(beta)) & (df.rho == rho)]["at_loss_0.01_pert_norm"].item()
            assert cell == format(want, ".3g") and float(cell) == pytest.approx(want, rel=5e-3)
    code, out, _ = run(capsys, str(folder / "summary.csv"), "--rows", "beta", "--cols", "rho", "--value",
                       "at_loss_0.01_pert_norm", "--where", "h=0.001", "--markdown")
    assert code == 0 and "| beta \\ rho | 0.9 | 0.99 | 0.999 |" in out
    row_09 = next(ln for ln in out.splitlines() if ln.startswith("| 0.9 |"))
    assert row_09.split(" | ")[2] == "—"  # never crossed: a dash, not a number
    row_05 = next(ln for ln in out.splitlines() if ln.startswith("| 0.5 |"))
    assert row_05.rstrip(" |").endswith("\\*") and "not finished" in out  # the running run is marked


def test_steps_are_exact_and_latex_escapes_and_writes_powers_of_ten(summary, capsys):
    folder, _ = summary
    code, out, _ = run(capsys, str(folder), "--rows", "beta", "--cols", "rho", "--value", "at_loss_0.01_step",
                       "--where", "h=0.01")
    assert code == 0 and "0.5 & 900 & 990 & 999 \\\\" in out  # integers exactly, LaTeX by default
    assert out.startswith("% at\\_loss\\_0.01\\_step") and "$\\beta$ \\textbackslash{} $\\rho$" in out
    code, out, _ = run(capsys, str(folder), "--rows", "beta", "--cols", "rho", "--value", "at_loss_0.01_pert_norm",
                       "--where", "h=0.01", "--fmt", ".2e", "--latex")
    assert re.search(r"\$\d\.\d\d\\times10\^\{-\d\}\$", out), out
    from analysis.table import number

    assert number(0.0, ".2e", False, "latex") == "0" and number(2.5, ".2e", False, "latex") == "2.50"
    assert number(1e-5, ".0e", False, "latex") == "$10^{-5}$" and number(NAN, ".2e", False, "latex") == "---"
    assert latex_escape("a_b%c&d#e$f{g}h~i^j\\k") == (
        "a\\_b\\%c\\&d\\#e\\$f\\{g\\}h\\textasciitilde{}i\\textasciicircum{}j\\textbackslash{}k")


def test_a_cell_of_several_runs_must_be_chosen_or_averaged(summary, capsys):
    folder, df = summary
    code, _, err = run(capsys, str(folder), "--rows", "beta", "--cols", "rho", "--value", "hill_height")
    assert code == 2 and err.count("\n") == 1 and "2 runs have beta=0.5, rho=0.9 (they differ in h)" in err
    code, out, _ = run(capsys, str(folder), "--rows", "beta", "--cols", "rho", "--value", "hill_height",
                       "--agg", "mean", "--csv")
    assert code == 0 and out.splitlines()[1] == "0.5,1.4,1.49,1.499"


@pytest.mark.parametrize("argv, says", [
    (["--rows", "gamma", "--cols", "rho", "--value", "hill_height"], "--rows gamma: not a column of the summary"),
    (["--rows", "beta", "--cols", "rho", "--value", "hill_height", "--where", "h=5"], "--where h=5: no run has h=5"),
    (["--rows", "beta", "--cols", "rho", "--value", "hill_height", "--where", "h"], "--where h: expected key=value"),
    (["--rows", "beta", "--cols", "rho", "--value", "state", "--where", "h=0.01"], "--value state: not a numeric"),
    (["--rows", "beta", "--cols", "rho", "--value", "hill_height", "--fmt", "zz"], "--fmt zz: not a Python format"),
])
def test_bad_arguments_are_one_line(summary, capsys, argv, says):
    folder, _ = summary
    code, out, err = run(capsys, str(folder), *argv)
    assert code == 2 and out == "" and err.startswith("error: ") and says in err and err.count("\n") == 1


def test_a_missing_or_damaged_summary_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, str(tmp_path), "--rows", "beta", "--cols", "rho", "--value", "x")
    assert code == 2 and "summary.csv: no such file" in err and "make analyze" in err
    (tmp_path / "summary.csv").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(capsys, str(tmp_path), "--rows", "beta", "--cols", "rho", "--value", "x")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (Debian: texlive-latex-base, "
                                                              "texlive-latex-recommended for booktabs)")
def test_the_latex_compiles(summary, capsys, tmp_path):
    folder, _ = summary
    for value, fmt in (("at_loss_0.01_pert_norm", ".2e"), ("at_loss_0.01_step", ".4g"), ("hill_height", ".3g")):
        assert main([str(folder), "--rows", "beta", "--cols", "rho", "--value", value, "--where", "h=0.001",
                     "--fmt", fmt, "--latex", "--out", str(tmp_path / f"{value}.tex")]) == 0
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                   + "".join(f"\\input{{{value}.tex}}\n\n" for value in ("at_loss_0.01_pert_norm", "at_loss_0.01_step",
                                                                          "hill_height"))
                   + "\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "doc.pdf").stat().st_size > 1000, r.stdout[-2000:]


def test_every_column_of_a_real_summary_is_explained(tmp_path, cfg_factory):
    """`python -m analysis` writes columns.md beside summary.csv: one line for every column of a
    real summary (a CNN with a test set, the toy model with its limit point)."""
    import analysis.__main__ as an
    from analysis.columns import describe
    from pipeline.train import train

    for over in (["train.max_steps=6"], ["sweep=toy", "train.max_steps=30", "train.progress=none"]):
        train(cfg_factory(*over, tiny=over[0] != "sweep=toy"))
    paths = an.analyze(tmp_path / "runs", tmp_path / "out", [1e3, 1e-30], [5], 1, 10.0, figures=False)
    columns = list(pd.read_csv(paths["summary"]).columns)
    assert "limit_one_norm" in columns and "at_loss_1000_test_acc" in columns and "at_step_5_pert_norm" in columns
    assert "at_loss_1e-30_step" in columns and "at_loss_1e-30_pert_norm" in columns  # never crossed: empty, kept
    unexplained = [c for c in columns if not describe(c)]
    assert unexplained == [], unexplained
    text = paths["columns"].read_text()
    assert all(f"| `{c}` |" in text for c in columns)


def test_a_one_way_table_from_rows_alone(summary, capsys):
    folder, df = summary
    code, out, _ = run(capsys, str(folder), "--rows", "beta", "--value", "hill_height", "--where", "h=0.01",
                       "--where", "rho=0.99", "--markdown")
    assert code == 0 and "| beta | hill_height |" in out
    assert [ln.split(" | ")[1].rstrip(" |") for ln in out.splitlines()[3:]] == ["1.49", "1.89"]
    code, out, err = run(capsys, str(folder), "--rows", "beta", "--value", "hill_height", "--where", "h=0.01")
    assert code == 2 and "3 runs have beta=0.5 (they differ in rho)" in err
