"""agents.viewer: the page's data equals its sources, token texts stay text, and the page works in a real browser.

The examples' JSON here is built by hand in the shapes the examples write (``examples/09``, ``06``, ``14`` and
``15``), so these tests take milliseconds; one slow test runs example 15 itself. The browser test drives Debian's
Chromium through chromedriver with Selenium, from ``file://`` (no server): it is skipped, with the reason, only where
chromium, chromedriver or selenium is not installed.
"""

import json
import math
import re
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest

from agents import viewer
from agents.viewer import ViewerError, embedded_data, write_viewer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVIL = "</script><b>x"  # a token that would close the data's script tag and open an element, were it markup


def number(t: int, k: int) -> float:
    """A float with all its digits, different for each token and field (exact equality is then a real check)."""
    return math.sin(1.7 * t + 0.31 * k + 0.1) * (1 + k) / 3.0


def example_09(texts=("pleasant", "and", "also", "<eos>")) -> dict:
    """The shape of examples/09_advantages_gae.py's JSON: a per-token table of one episode, and the batch."""
    fields = ("log_pi", "log_pi_ref", "kl", "reward", "value", "td_error", "advantage", "return", "G-V (lam=1)")
    rows = [
        {"t": t, "token": text, "action": 300 + t, **{name: number(t, k) for k, name in enumerate(fields)}}
        for t, text in enumerate(texts)
    ]
    return {"gamma": 1.0, "lam": 0.95, "prompt": "We all felt the soundtrack was", "terminated": True,
            "value_after_last": 0.0616, "tokens": rows,
            "batch": {"rewards": [[0.1] * 4], "mask": [[True] * 4], "advantages": [[0.2] * 4]}}  # fmt: skip


def example_06() -> dict:
    """examples/06_value_head.py names its token ``next token a_t`` and the value ``V(s_t)``."""
    rows = [{"t": t, "next token a_t": text, "V_untrained": 0.0, "V(s_t)": number(t, 1), "reward": number(t, 2),
             "G_t": number(t, 3)} for t, text in enumerate(["great", "<eos>"])]  # fmt: skip
    return {"prompt": "The pacing was", "explained_variance": {"warm agent's head": 0.02}, "tokens": rows}


def example_15() -> dict:
    """examples/15_multi_turn.py: the calculator's tokens are in the table, with ``None`` for every number."""
    whose = ["agent", "agent", "calculator", "calculator", "calculator", "agent", "agent", "agent"]
    texts = ["?", "<eos>", "4", "2", ":", "4", "2", "<eos>"]
    rows = []
    for column, (who, text) in enumerate(zip(whose, texts)):
        agent = who == "agent"
        rows.append({"column": column, "token": text, "whose": who,
                     **{name: number(column, k) if agent else None
                        for k, name in enumerate(("reward", "kl", "value", "advantage", "return"))}})  # fmt: skip
    return {"prompt": "17+25=", "score": 1.0, "terminated": True, "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95,
            "bootstrap_value": 1.09, "called_rate": 0.94, "tokens": rows}  # fmt: skip


def example_14() -> dict:
    """examples/14_ppo_grpo_rloo.py: a batch of (B, T) arrays and one summary row per episode; no token texts."""
    mask = [[True, True, True, False], [True, True, False, False]]
    grid = [[number(b, t) for t in range(4)] for b in range(2)]
    return {
        "group_size": 2, "gamma": 1.0, "lam": 0.95, "prompts": ["The pacing was", "The pacing was"],
        "rows": [{"episode": b, "group": 0, "response": r, "score": s, "R_i": s}
                 for b, (r, s) in enumerate([(" fine.", 0.5), (" bad", -1.0)])],
        "mask": mask, "rewards": grid, "values": [row + [0.0] for row in grid],
        "terminated_steps": [[False, False, True, False], [False, False, False, False]],
        "advantages": {algo: [[number(b + k, t) for t in range(4)] for b in range(2)]
                       for k, algo in enumerate(("ppo", "rloo", "grpo"))},
    }  # fmt: skip


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def page_of(paths, out: Path) -> dict:
    return embedded_data(write_viewer(paths, out).read_text(encoding="utf-8"))


def test_token_numbers_in_the_page_equal_the_example_json(tmp_path):
    source = example_09()
    data = page_of([write(tmp_path / "09_advantages_gae.json", source)], tmp_path / "view.html")
    (ep,) = data["episodes"]
    assert ep["source"] == "09_advantages_gae.json" and ep["prompt"] == source["prompt"]
    assert [tok["text"] for tok in ep["tokens"]] == [row["token"] for row in source["tokens"]]
    for tok, row in zip(ep["tokens"], source["tokens"]):
        assert tok["fields"] == {k: v for k, v in row.items() if k != "token"}  # every number, bit for bit
        assert tok["env"] is False
    assert ep["summary"]["gamma"] == 1.0 and ep["summary"]["terminated"] is True
    keys = [q["key"] for q in data["quantities"]]
    assert keys[:8] == ["log_pi", "log_pi_ref", "kl", "reward", "value", "td_error", "advantage", "return"]
    assert "G-V (lam=1)" in keys and "t" not in keys and "action" not in keys  # positions and ids are not coloured
    centre = {q["key"]: q["centre"] for q in data["quantities"]}
    assert centre["advantage"] == 0.0 and centre["log_pi"] is None


def test_the_sources_names_of_one_quantity_share_its_selector_entry(tmp_path):
    write(tmp_path / "06_value_head.json", example_06())
    write(tmp_path / "09_advantages_gae.json", example_09())
    data = page_of([tmp_path], tmp_path / "view.html")
    six, nine = data["episodes"]
    assert six["aliases"]["value"] == "V(s_t)" and nine["aliases"]["value"] == "value"
    assert [tok["text"] for tok in six["tokens"]] == ["great", "<eos>"]
    assert six["tokens"][0]["fields"]["V(s_t)"] == example_06()["tokens"][0]["V(s_t)"]
    assert [q["key"] for q in data["quantities"]].count("value") == 1


def test_environment_tokens_of_a_multi_turn_episode_are_marked(tmp_path):
    source = example_15()
    (ep,) = page_of([write(tmp_path / "15_multi_turn.json", source)], tmp_path / "view.html")["episodes"]
    assert [tok["env"] for tok in ep["tokens"]] == [row["whose"] != "agent" for row in source["tokens"]]
    assert ep["tokens"][2]["fields"]["reward"] is None and ep["tokens"][2]["fields"]["whose"] == "calculator"
    assert ep["summary"]["score"] == 1.0


def test_a_batch_without_token_texts_shows_each_step(tmp_path):
    source = example_14()
    data = page_of([write(tmp_path / "14_ppo_grpo_rloo.json", source)], tmp_path / "view.html")
    assert len(data["episodes"]) == 2
    for b, ep in enumerate(data["episodes"]):
        steps = [t for t, on in enumerate(source["mask"][b]) if on]
        assert [tok["text"] for tok in ep["tokens"]] == [f"#{t}" for t in steps]
        assert ep["response"] == source["rows"][b]["response"] and ep["summary"]["score"] == source["rows"][b]["score"]
        for t, tok in zip(steps, ep["tokens"]):
            assert tok["fields"]["reward"] == source["rewards"][b][t]
            assert tok["fields"]["value"] == source["values"][b][t]
            for algo, a in source["advantages"].items():
                assert tok["fields"][f"advantage ({algo})"] == a[b][t]
        assert ep["aliases"]["advantage"] == "advantage (ppo)"


def test_token_text_cannot_close_the_script_or_make_markup(tmp_path):
    source = example_09(texts=(EVIL, "<!--", "&amp;", "<eos>"))
    source["prompt"] = "<script>alert(1)</script>"
    page = write_viewer([write(tmp_path / "05_kl_penalty.json", source)], tmp_path / "view.html").read_text()
    assert EVIL not in page and "<!--<" not in page and "alert(1)</script>" not in page
    assert page.count("</script>") == 2  # the data's and the code's
    data = embedded_data(page)
    assert [tok["text"] for tok in data["episodes"][0]["tokens"]][:3] == [EVIL, "<!--", "&amp;"]
    assert data["episodes"][0]["prompt"] == source["prompt"]
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_not_a_number_is_shown_as_text_and_the_page_stays_valid_json(tmp_path):
    source = example_09()
    source["tokens"][1]["td_error"] = float("nan")
    source["value_after_last"] = float("inf")
    path = tmp_path / "09_advantages_gae.json"
    path.write_text(json.dumps(source))  # Python writes NaN and Infinity, which JSON.parse refuses
    (ep,) = page_of([path], tmp_path / "view.html")["episodes"]
    assert ep["tokens"][1]["fields"]["td_error"] == "NaN" and ep["summary"]["value_after_last"] == "Infinity"


def samples_rows() -> list[dict]:
    """What agents.train logs (agents/logger.py): iteration, prompt, response and score, no per-token numbers."""
    return [{"iteration": i, "prompt": f"prompt {i}{k}", "response": f" response <b>{k}</b>", "score": number(i, k)}
            for i in range(2) for k in range(2)]  # fmt: skip


def test_a_run_shows_its_samples_as_text(tmp_path):
    run = tmp_path / "runs" / "ppo"
    run.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in samples_rows())
    (run / "samples.jsonl").write_text(lines + '{"iteration": 2, "prom')  # a line cut off by a kill is dropped
    data = page_of([run], tmp_path / "view.html")
    assert len(data["episodes"]) == 4
    for ep, row in zip(data["episodes"], samples_rows()):
        assert ep["source"] == "ppo/samples.jsonl" and ep["tokens"] == [] and "text only" in ep["note"]
        assert (ep["prompt"], ep["response"], ep["summary"]["score"]) == (row["prompt"], row["response"], row["score"])
    assert [ep["title"] for ep in data["episodes"]][1:3] == ["iteration 0, sample 1", "iteration 1, sample 0"]
    assert data["quantities"] == []


def test_samples_with_per_token_lists_show_their_tokens(tmp_path):
    row = {"iteration": 3, "prompt": "17+25=", "response": "?42:42", "score": 1.0,
           "tokens": ["?", "<eos>", "4", "2", ":", "4", "2", "<eos>"],
           "env": [False, False, True, True, True, False, False, False],
           "logprob": [-0.1, -0.2, None, None, None, -0.3, -0.4, -0.5],
           "advantage": [0.5, 0.4, None, None, None, 0.3, 0.2, 0.1]}  # fmt: skip
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ep,) = page_of([path], tmp_path / "view.html")["episodes"]
    assert [tok["text"] for tok in ep["tokens"]] == row["tokens"]
    assert [tok["env"] for tok in ep["tokens"]] == row["env"]
    assert [tok["fields"]["logprob"] for tok in ep["tokens"]] == row["logprob"]
    assert ep["aliases"] == {"log_pi": "logprob", "advantage": "advantage"}


def test_the_examples_folder_skips_examples_without_per_token_numbers(tmp_path, capsys):
    write(tmp_path / "09_advantages_gae.json", example_09())
    write(tmp_path / "15_multi_turn.json", example_15())
    write(tmp_path / "04_four_roles.json", {"roles": [{"role": "actor"}], "grad_norm_per_loss": {}})
    write(tmp_path / "12_train_end_to_end.json", {"samples": [{"prompt": "a", "before": "b"}], "metrics": []})
    out = viewer.main([str(tmp_path), "--out", str(tmp_path / "page" / "view.html")])
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "2 episodes, 12 tokens" in printed and "skipped 04_four_roles.json" in printed
    data = embedded_data(out.read_text())
    assert [ep["source"] for ep in data["episodes"]] == ["09_advantages_gae.json", "15_multi_turn.json"]
    assert data["skipped"] == [
        "04_four_roles.json: no per-token numbers",
        "12_train_end_to_end.json: no per-token numbers",
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.json", "no such file or directory"),
        (lambda d: write(d / "04_four_roles.json", {"roles": []}), "is not an example's JSON with per-token numbers"),
        (lambda d: write(d / "config.json", [1, 2]), "is not an example's JSON"),
        (lambda d: text_file(d / "broken.json", "{"), "is not valid JSON"),
        (lambda d: text_file(d / "samples.jsonl", ""), "holds no samples"),
        (lambda d: text_file(d / "samples.jsonl", "\n").parent, "holds no samples"),
        (lambda d: text_file(d / "samples.jsonl", '{"a": 1}\n').parent, "is not a run's samples file"),
        (lambda d: d, "holds no samples.jsonl (a run directory) and no examples' NN_name.json"),
    ],
    ids=[
        "missing",
        "example-without-tokens",
        "not-an-object",
        "invalid-json",
        "empty-samples",
        "blank-run",
        "not-samples",
        "empty-folder",
    ],
)
def test_paths_it_cannot_show_are_clear_errors(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(ViewerError, match=re.escape(message)):
        write_viewer([path], tmp_path / "view.html")
    with pytest.raises(SystemExit) as stopped:
        viewer.main([str(path), "--out", str(tmp_path / "view.html")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "view.html").exists()


@pytest.mark.slow
def test_the_page_of_example_15_itself(tmp_path):
    """Example 15 as it runs (the SFT policy, no training: a few seconds): its tokens, numbers and calculator tokens."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(EXAMPLES / "15_multi_turn.py"), "--out", str(tmp_path), "--iterations", "0"])
        patch.syspath_prepend(str(EXAMPLES))  # the examples import their shared helpers as `common`
        runpy.run_path(str(EXAMPLES / "15_multi_turn.py"), run_name="__main__")
    source = json.loads((tmp_path / "15_multi_turn.json").read_text())
    (ep,) = page_of([tmp_path / "15_multi_turn.json"], tmp_path / "view.html")["episodes"]
    assert [tok["text"] for tok in ep["tokens"]] == [row["token"] for row in source["tokens"]]
    assert [tok["fields"] for tok in ep["tokens"]] == [{k: v for k, v in r.items() if k != "token"}
                                                       for r in source["tokens"]]  # fmt: skip
    assert any(tok["env"] for tok in ep["tokens"]), "the episode shown should have called the calculator"
    assert set(ep["aliases"]) == {"reward", "kl", "value", "advantage", "return"}


# --- the page in a real browser -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_in_chromium(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    write(tmp_path / "09_advantages_gae.json", example_09(texts=("pleasant", EVIL, "and", "<eos>")))
    write(tmp_path / "14_ppo_grpo_rloo.json", example_14())
    write(tmp_path / "15_multi_turn.json", example_15())
    run = tmp_path / "run"
    run.mkdir()
    text_file(run / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples_rows()))
    page = write_viewer([tmp_path, run], tmp_path / "view.html")
    data = embedded_data(page.read_text())

    started = time.perf_counter()
    browser.get(page.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    chips = browser.find_elements(By.CSS_SELECTOR, ".token")
    tokens = [(ep, tok) for ep in data["episodes"] for tok in ep["tokens"]]
    assert len(chips) == len(tokens) == 4 + 5 + 8
    assert len(browser.find_elements(By.CSS_SELECTOR, "section.episode")) == len(data["episodes"]) == 1 + 2 + 1 + 4

    def shown() -> dict[str, str]:  # the details panel: each field's name and its full value (the cell's title)
        cells = "document.querySelectorAll('#details-table td')"
        return dict(browser.execute_script(f"return [...{cells}].map(c => [c.dataset.key, c.title])"))

    def hover(chip) -> None:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", chip)  # clear of the sticky header
        ActionChains(browser, duration=0).move_to_element(chip).perform()

    def click(chip) -> None:
        hover(chip)
        chip.click()

    def as_json(value) -> str:  # what String(value) gives in JavaScript, for the numbers and flags of the data
        return "null" if value is None else json.dumps(value)

    for i in (0, 1, 5, 9, 11, 16):  # 09's tokens (the second is EVIL), 14's steps, 15's agent and calculator tokens
        ep, tok = tokens[i]
        hover(chips[i])
        assert browser.find_element(By.ID, "details-token").text == tok["text"] == chips[i].text
        values = shown()
        assert list(values) == list(tok["fields"])
        for key, value in tok["fields"].items():
            if isinstance(value, float):
                assert float(values[key]) == value, (i, key)  # the numbers of the JSON, to the last bit
            else:
                assert values[key] == (value if isinstance(value, str) else as_json(value)), (i, key)
        whose = browser.find_element(By.ID, "details-whose").text
        assert whose.startswith("The environment's token") == tok["env"] == ("env" in chips[i].get_attribute("class"))
    assert tokens[11][1]["env"] and not tokens[9][1]["env"]
    assert browser.find_elements(By.CSS_SELECTOR, ".tokens b, .tokens script") == []  # EVIL stayed text

    click(chips[0])  # pinned: hovering elsewhere leaves its numbers shown
    hover(chips[3])
    assert browser.find_element(By.ID, "details-token").text == tokens[0][1]["text"]
    assert "pinned" in chips[0].get_attribute("class")
    click(chips[0])
    hover(chips[3])
    assert browser.find_element(By.ID, "details-token").text == tokens[3][1]["text"]

    Select(browser.find_element(By.ID, "quantity")).select_by_value("advantage")
    assert "advantage" in browser.find_element(By.ID, "legend-caption").text
    colours = browser.execute_script("return arguments[0].map(c => getComputedStyle(c).backgroundColor)", chips)
    for rgb, (ep, tok) in zip(colours, tokens):
        a = tok["fields"].get(ep["aliases"].get("advantage"))
        red, _, blue = (int(x) for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
        if a is None:
            assert red == blue, (tok["text"], rgb)  # no colour: white, or the environment's grey stripes
        elif abs(a) > 0.1:
            assert (blue > red) == (a > 0), (tok["text"], a, rgb)  # diverging: blue above 0, red below

    Select(browser.find_element(By.ID, "source")).select_by_value("15_multi_turn.json")
    assert len([s for s in browser.find_elements(By.CSS_SELECTOR, "section.episode") if s.is_displayed()]) == 1
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    print(f"browser checks: {time.perf_counter() - started:.2f} s")
