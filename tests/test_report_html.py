"""report.html: well-formed, self-contained (no script, nothing fetched), one card per requested
atom, figures that print report.json's numbers, failed or missing experiments as notes, ids that do
not decode and text that looks like HTML shown safely; the SVG axes and the partition threshold."""

import json
import math
from html.parser import HTMLParser

import pytest
import torch

import eval as ev
import stats
import report_html
import svg
from test_eval import FAST, build, site_of, text  # noqa: F401  (text is a fixture)

VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}


class Page(HTMLParser):
    """Collects the tag structure: a stack that must balance, every attribute, every text run."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.attrs, self.tags, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.attrs += attrs
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <line .../> and the like
        self.tags.append((tag, dict(attrs)))
        self.attrs += attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html):
    p = Page()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors[:3], p.stack[-3:])
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert not [v for k, v in p.attrs if k in ("src", "href") and "http" in (v or "")]
    return p, " ".join(p.text)


@pytest.fixture(scope="module")
def run(tmp_path_factory, text):  # noqa: F811
    """The experiments on a tiny GDN site, report written: site, ids, report.json, the page."""
    tmp = tmp_path_factory.mktemp("report")
    model, tok, ids = build("gdn", tmp / "model", text)
    site = site_of(model, tok)
    exps = "subst,closed,erase,install,partition,atoms"  # those with a figure, and the cards
    res = ev.evaluate(site, ids, ev.parse_args(FAST + ["--exp", exps, "--cards", "5"]))
    ev.write_report(tmp, res, {"model": "tiny", "arch": model.arch, "layer": site.layer,
                               "head": site.head})
    report = json.loads((tmp / "report.json").read_text())
    html = (tmp / "report.html").read_text()
    return site, ids, report, html, *parse(html)


def test_one_card_for_each_of_the_most_active_atoms(run):
    site, ids, report, html, page, _ = run
    cards = [a["id"] for t, a in page.tags if t == "section" and a.get("class") == "card"]
    atoms = [c["atom"] for c in report["atoms"]["cards"]]
    assert cards == [f"atom-{i}" for i in atoms] and len(atoms) == 5
    count = sum((ev.scan_block(site, b)["codes"] > 0).sum(0) for b in ids.long())  # firings per atom
    assert sorted(count[atoms].tolist()) == sorted(count.topk(5).values.tolist())
    assert [c["firings"] for c in report["atoms"]["cards"]] == count[atoms].tolist()
    codes = torch.stack([ev.scan_block(site, b)["codes"] for b in ids.long()])  # [blocks,T,n]
    for c in report["atoms"]["cards"]:  # contexts strongest first, the first at the atom's maximum
        peak = [x["acts"][x["at"]] for x in c["contexts"]]
        assert peak == sorted(peak, reverse=True)
        assert peak[0] == round(codes[..., c["atom"]].max().item(), 3)
        assert all(codes[x["block"], x["t"], c["atom"]] > 0 for x in c["contexts"])
        assert sum(c["hist"]["counts"]) == c["firings"]


def test_figures_print_the_numbers_of_report_json(run):
    _, _, report, html, page, text = run
    subst = report["subst"]["points"]
    assert f"n = {len(subst['kl_atom'])} firings" in text and len(subst["atom"]) > 0
    for h, c in report["closed"]["points"].items():
        assert f"h = {h}: R² = {c['r2']:.3f}, n = {len(c['pred'])}" in text
        div = next(a for t, a in page.tags if t == "div" and a.get("data-h") == h)
        assert float(div["data-r2"]) == c["r2"] and int(div["data-n"]) == len(c["meas"])
    part = report["partition"]
    assert f"n = {part['alive']} alive atoms" in text
    assert len(part["points"]["atoms"]) == part["alive"]
    assert f"threshold {part['threshold']:.3f}" in text
    for e in report["erase"]["effects"] + report["install"]["effects"]:
        assert f"{e['name']} (n = {e['n']})" in text
        assert f"{e['name']} = {report_html.fmt(e['value'])} [" in text
    circles = sum(t == "circle" for t, _ in page.tags)  # every closed-form point is drawn
    assert circles >= sum(len(c["pred"]) for c in report["closed"]["points"].values())


def test_failed_and_missing_experiments_are_notes_and_text_is_escaped():
    report = {"meta": {"model": "<b>m</b>", "layer": 1, "head": 0},
              "subst": {"error": "out of <memory> & time"}, "closed": {"by_h": {}},
              "erase": {"effects": [{"name": "<i>x</i>", "value": -0.5, "ci": [-0.9, -0.1], "n": 7,
                                     "unit": "nats"}]}}
    html = report_html.page(report)
    page, text = parse(html)
    assert "subst: skipped, the experiment failed: out of <memory> & time" in text
    assert "closed: skipped, report.json has no “points”" in text
    assert "partition: not in this report" in text and "No atom cards" in text
    assert "<b>m</b>" in text and "<b>" not in html and "<i>x</i> (n = 7)" in text
    assert [t for t, _ in page.tags].count("figure") == 1


def test_cards_survive_ids_that_do_not_decode(run):
    site, ids = run[:2]
    scans = [ev.scan_block(site, b) for b in ids.long()]
    decode = lambda x: None if x[0] % 2 else f"<{x[0]}>"  # noqa: E731
    args = ev.parse_args(["--cards", "3"])
    atoms = report_html.atom_cards(site, ids.long(), scans, args,
                                   lambda sc: ev.native(site, sc, slice(None)), decode)
    html = report_html.page({"meta": {}, "atoms": atoms})
    _, shown = parse(html)
    toks = [s for c in atoms["cards"] for x in c["contexts"] for s in x["tokens"]]
    assert len(atoms["cards"]) == 3 and toks
    assert all(s.startswith("#") and int(s[1:]) % 2 or s.startswith("<") for s in toks)
    assert all(s in shown for s in toks)


def test_token_text_makes_every_token_visible():
    texts = {0: "a\nb", 1: "\r", 2: "", 3: None, 4: " x\u200b", 5: "<b>"}
    shown = [report_html.token_text(lambda ids: texts[ids[0]], i) for i in texts]
    assert shown == ["a↵b", "\\r", "#2", "#3", " x\\u200b", "<b>"]


def test_atoms_alone_from_the_command_line(tmp_path, text):  # noqa: F811
    import train
    build("gdn", tmp_path / "model", text)
    (tmp_path / "corpus.txt").write_text(text)
    run = tmp_path / "run"
    train.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "corpus.txt"),
                "--seq-len", "48", "--n-seqs", "12", "--epochs", "1", "--n-feat", "32", "--k", "4",
                "--batch", "64", "--out", str(run), "--device", "cpu"])
    res = ev.main(["--run", str(run), "--device", "cpu", "--exp", "atoms", "--cards", "4"])
    page, text = parse((run / "eval" / "report.html").read_text())
    assert set(res) == {"atoms"} and len(res["atoms"]["cards"]) == 4
    assert sum(a.get("class") == "card" for _, a in page.tags) == 4
    assert "subst: not in this report" in text and "figure" not in [t for t, _ in page.tags]


def test_axis_ticks_and_log_scatter():
    a = svg.Axis(0.013, 0.87, 0, 100)
    t = a.ticks()
    assert 3 <= len(t) <= 10 and all(0.013 <= x <= 0.87 for x in t)
    assert len({round(b - c, 12) for b, c in zip(t[1:], t)}) == 1  # equal steps
    assert svg.Axis(1e-3, 20, 0, 100, log=True).ticks() == [1e-3, 1e-2, 1e-1, 1, 10]
    out = svg.scatter([("a", "#000", [1e-3, 0.0, 2.0], [1.0, 1.0, -1.0])], "x", "y", log=True)
    assert out.count("<circle") == 1
    assert svg.num(1500) == "1.5k" and svg.num(0.25) == "0.25" and svg.num(2e-5) == "2e-5"
    edges, counts = svg.bin_counts([0.0, 0.1, 0.5, 1.0], 4)
    assert counts == [2, 0, 1, 1] and edges[0] == 0.0 and edges[-1] == 1.0


@pytest.mark.parametrize("mu,var,pi", [((0.0, 1.0), (0.04, 0.04), (0.5, 0.5)),     # equal
                                       ((0.0, 0.3), (0.001, 0.01), (0.8, 0.2)),    # broad register
                                       ((0.15, 0.31), (0.005, 0.03), (0.9, 0.1)),  # beyond its mean
                                       ((0.0, 0.3), (0.02, 0.002), (0.7, 0.3))])   # narrow register
def test_partition_threshold_is_where_the_register_component_takes_over(mu, var, pi):
    x = stats.crossing(list(mu), list(var), list(pi))
    def dens(x, j):  # w_j N(x; m_j, v_j) up to the common 1/√(2π)
        return pi[j] * math.exp(-0.5 * (x - mu[j]) ** 2 / var[j]) / math.sqrt(var[j])
    assert dens(x, 0) == pytest.approx(dens(x, 1), rel=1e-9) and x > mu[0]
    assert dens(x - 1e-3, 1) < dens(x - 1e-3, 0) and dens(x + 1e-3, 1) > dens(x + 1e-3, 0)
    if var[0] == var[1] and pi[0] == pi[1]:
        assert x == pytest.approx(sum(mu) / 2)
