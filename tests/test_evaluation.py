"""Win rates, verdict files, the KL estimator, answer export and ``jaxalign eval``."""

import json
import math

import numpy as np
import pytest

from jaxalign.evaluation import (
    RuleJudge,
    VerdictJudge,
    export_answers,
    kl_estimate,
    length_stats,
    make_judge,
    read_verdicts,
    win_rate,
)
from jaxalign.judging import Candidate


def test_win_rate_counts_ties_as_half_and_interval_by_hand():
    a = [2, 1, 1, 0, 2]
    b = [1, 1, 2, 0, 0]
    wr = win_rate(a, b)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 2, 1, 5)
    outcomes = np.array([1, 0.5, 0, 0.5, 1])
    assert math.isclose(wr.rate, 0.6)
    half = 1.96 * outcomes.std(ddof=1) / math.sqrt(5)
    assert math.isclose(wr.ci_low, 0.6 - half) and math.isclose(wr.ci_high, min(1.0, 0.6 + half))


def test_win_rate_clips_interval_and_handles_empty():
    wr = win_rate([1, 1, 1], [0, 0, 0])
    assert wr.rate == 1.0 and wr.ci_low == 1.0 and wr.ci_high == 1.0
    assert math.isnan(win_rate([], []).rate)
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1, 2], [1])


# ----------------------------------------------------------------------------- judges


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_verdict_file_reads_both_forms_and_gives_hand_win_rate(tmp_path):
    path = _write_lines(
        tmp_path / "v.jsonl",
        [
            '{"id": "a", "winner": "model"}',
            '{"id": "b", "winner": "tie"}',
            "",
            '{"id": "c", "score": 3, "baseline_score": 7.5}',
            '{"id": 4, "winner": "baseline"}',
            '{"id": "e", "score": 9.0, "baseline_score": 2}',
        ],
    )
    verdicts = read_verdicts(path)
    assert verdicts == {
        "a": (1.0, 0.0),
        "b": (0.0, 0.0),
        "c": (3.0, 7.5),
        "4": (0.0, 1.0),
        "e": (9.0, 2.0),
    }
    judge = make_judge(f"verdicts:{path}")
    records = [{"id": i, "prompt": "q"} for i in ("e", "a", "b", "c", 4)]
    ours, base = judge.compare(records, [None] * 5, [None] * 5)
    wr = win_rate(ours, base)
    # outcomes e, a, b, c, 4 = 1, 1, 1/2, 0, 0 -> (2 + 0.5) / 5
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 2)
    assert math.isclose(wr.rate, 0.5)
    half = 1.96 * np.std([1, 1, 0.5, 0, 0], ddof=1) / math.sqrt(5)
    assert math.isclose(wr.ci_low, 0.5 - half) and math.isclose(wr.ci_high, 0.5 + half)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"winner": "model"}', "needs an 'id'"),
        ('{"id": "a", "winner": "A"}', "must be one of model, baseline, tie"),
        ('{"id": "a", "score": "high", "baseline_score": 1}', "field 'score'"),
        ('{"id": "a", "score": 1}', "field 'baseline_score'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_verdict_file_errors_name_the_line(tmp_path, line, message):
    path = _write_lines(tmp_path / "v.jsonl", ['{"id": "x", "winner": "tie"}', line])
    with pytest.raises(ValueError, match=message) as info:
        read_verdicts(path)
    assert f"{path}:2" in str(info.value)


def test_verdict_judge_wants_every_prompt_and_no_repeats(tmp_path):
    path = _write_lines(tmp_path / "v.jsonl", ['{"id": "a", "winner": "tie"}'])
    with pytest.raises(ValueError, match="no verdict for 1 of 2 prompts"):
        make_judge(f"verdicts:{path}").compare([{"id": "a"}, {"id": "b"}], [None] * 2, [None] * 2)
    _write_lines(path, ['{"id": "a", "winner": "tie"}', '{"id": "a", "winner": "model"}'])
    with pytest.raises(ValueError, match="second verdict"):
        read_verdicts(path)


def test_make_judge_specs():
    assert make_judge("demo-checker") == RuleJudge("demo-checker")
    assert make_judge("rule:demo-checker").name == "rule:demo-checker"
    assert isinstance(make_judge("verdicts:some.jsonl"), VerdictJudge)
    with pytest.raises(ValueError, match="unknown judge 'gpt-4'"):
        make_judge("gpt-4")
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        make_judge("rule:nope")
    with pytest.raises(ValueError, match="argument after ':'"):
        make_judge("verdicts:")


def test_rule_judge_scores_answers_by_hand():
    records = [
        {"id": "1", "prompt": "Capital of France?", "answer": ["Paris"]},
        {"id": "2", "prompt": "2+2?", "answer": "four"},
    ]
    ours = [Candidate("Paris.", True, 2), Candidate("It is five.", True, 4)]
    base = [Candidate("Paris is the capital", False, 5), Candidate("four", True, 1)]
    a, b = RuleJudge("demo-checker").compare(records, ours, base)
    # score = correct + (ended by EOS within 25 words)
    np.testing.assert_array_equal(a, [2.0, 1.0])
    np.testing.assert_array_equal(b, [1.0, 2.0])


def test_length_stats_by_hand():
    stats = length_stats([Candidate("a b c", True, 4), Candidate("d", False, 9)])
    assert stats == {
        "mean_words": 2.0,
        "median_words": 2.0,
        "mean_tokens": 6.5,
        "max_tokens": 9,
        "finished_fraction": 0.5,
    }


# ----------------------------------------------------------------------------- KL


def test_kl_estimate_by_hand():
    kl = kl_estimate([-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0], num_tokens=[1, 2, 3])
    diffs = np.array([0.5, 0.5, -1.0])
    assert kl.n == 3 and math.isclose(kl.kl, 0.0, abs_tol=1e-15)
    assert math.isclose(kl.stderr, diffs.std(ddof=1) / math.sqrt(3))
    assert math.isclose(kl.kl_per_token, 0.0, abs_tol=1e-15)
    kl = kl_estimate([-1.0, -1.0], [-3.0, -2.0], num_tokens=[2, 4])
    assert math.isclose(kl.kl, 1.5) and math.isclose(kl.kl_per_token, 3.0 / 6.0)
    assert math.isnan(kl_estimate([], []).kl)
    with pytest.raises(ValueError, match="equal length"):
        kl_estimate([1.0], [1.0, 2.0])


def test_kl_estimate_matches_exact_categorical_kl():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(p * np.log(p / q)))
    y = rng.choice(4, size=20000, p=p)
    kl = kl_estimate(np.log(p[y]), np.log(q[y]))
    assert abs(kl.kl - exact) < 4 * kl.stderr


# ----------------------------------------------------------------------------- export


RECORDS = [
    {"id": "81", "prompt": "Write a haiku.", "dataset": "helpful_base"},
    {
        "id": "q-2",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
]


def test_alpaca_eval_export_has_the_fields_alpaca_eval_reads(tmp_path):
    paths = export_answers(
        "alpaca_eval", tmp_path, RECORDS, {"mine": ["A haiku.", "Rayleigh"], "sft": ["x", "y"]}
    )
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "alpaca_eval/mine/model_outputs.json",
        "alpaca_eval/sft/model_outputs.json",
    ]
    rows = json.loads(paths[0].read_text(encoding="utf-8"))
    assert isinstance(rows, list) and len(rows) == 2
    for row in rows:
        assert {"instruction", "output", "generator"} <= set(row)
        assert all(isinstance(row[k], str) for k in row)
    assert rows[0] == {
        "instruction": "Write a haiku.",
        "output": "A haiku.",
        "generator": "mine",
        "dataset": "helpful_base",
    }
    assert rows[1] == {
        "instruction": "Why is the sky blue?",
        "output": "Rayleigh",
        "generator": "mine",
    }


def test_mt_bench_export_loads_like_fastchat(tmp_path):
    paths = export_answers("mt_bench", tmp_path, RECORDS, {"mine": ["A haiku.", "Rayleigh"]})
    assert paths == [tmp_path / "mt_bench" / "model_answer" / "mine.jsonl"]
    # fastchat.llm_judge.common.load_model_answers: model name from the file name, answers
    # keyed by question_id; judges read choices[0]["turns"][turn].
    answers = {}
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        answers[record["question_id"]] = record
    assert set(answers) == {81, "q-2"}
    for qid, output in ((81, "A haiku."), ("q-2", "Rayleigh")):
        a = answers[qid]
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(a["answer_id"], str) and a["answer_id"]
        assert a["model_id"] == paths[0].stem == "mine"
        assert isinstance(a["tstamp"], float)
        assert a["choices"] == [{"index": 0, "turns": [output]}]
    assert answers[81]["answer_id"] != answers["q-2"]["answer_id"]
    with pytest.raises(ValueError, match="unknown export format"):
        export_answers("arena", tmp_path, RECORDS, {"mine": ["a", "b"]})


# ----------------------------------------------------------------------------- jaxalign eval


def test_eval_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    from jaxalign.cli import main

    out = tmp_path / "eval"
    common = ["--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir)]
    common += ["--prompts", "demo", "--max-prompts", "8", "--max-new-tokens", "6"]
    common += ["--batch-size", "8", "--no-progress", "--out", str(out)]
    rc = main(
        [
            "eval",
            *common,
            "--judge",
            "demo-checker",
            "--kl-samples",
            "1",
            "--baseline-name",
            "sft",
            "--export",
            "alpaca_eval",
            "--export",
            "mt_bench",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win rate 0.500" in printed and "KL(model || baseline)" in printed
    summary = json.loads((out / "eval.json").read_text())
    # The same model greedily answers the same prompts the same way: every prompt is a tie,
    # and its samples have the same log-prob under "both" models, so KL is exactly 0.
    assert summary["win_rate"]["ties"] == 8 and summary["win_rate"]["rate"] == 0.5
    assert summary["kl"]["n"] == 8 and summary["kl"]["kl"] == 0.0
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and all(a["response"] == a["baseline"] for a in answers)
    assert all(a["num_tokens"] <= 6 for a in answers)
    samples = [json.loads(x) for x in (out / "kl_samples.jsonl").read_text().splitlines()]
    assert all(s["logp_model"] < 0 for s in samples)
    name = tiny_model_dir.name
    assert (out / "alpaca_eval" / name / "model_outputs.json").is_file()
    assert (out / "alpaca_eval" / "sft" / "model_outputs.json").is_file()
    assert (out / "mt_bench" / "model_answer" / "sft.jsonl").is_file()

    # An external judge's verdicts on the saved answers; no model is run for this.
    ids = [a["id"] for a in answers]
    winners = ["model", "model", "model", "baseline", "tie", "tie", "model", "baseline"]
    verdicts = _write_lines(
        tmp_path / "verdicts.jsonl",
        [json.dumps({"id": i, "winner": w}) for i, w in zip(ids, winners, strict=True)],
    )
    rc = main(
        [
            "eval",
            *common,
            "--answers",
            str(out / "answers.jsonl"),
            "--judge",
            f"verdicts:{verdicts}",
            "--kl-samples",
            "0",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["win_rate"]["wins"], summary["win_rate"]["losses"]) == (4, 2)
    assert math.isclose(summary["win_rate"]["rate"], (4 + 2 * 0.5) / 8)
    assert "kl" not in summary

    rc = main(
        [
            "eval",
            *common,
            "--judge",
            "verdicts:missing.jsonl",
            "--kl-samples",
            "0",
            "--answers",
            str(out / "answers.jsonl"),
        ]
    )
    assert rc == 1 and "missing.jsonl not found" in capsys.readouterr().err


def test_paired_bootstrap_matches_normal_theory_and_pairs():
    from jaxalign.evaluation import bootstrap_statistic, paired_bootstrap

    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.2, 0.5])
    low, high = paired_bootstrap(x, resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal interval for a mean
    assert abs(low - (x.mean() - half)) < 0.01 and abs(high - (x.mean() + half)) < 0.01
    assert paired_bootstrap(np.full(50, 0.25)) == (0.25, 0.25)
    # Paired by prompt: a shared per-prompt difficulty cancels in the difference, so the
    # interval of the mean difference is far narrower than one from independent draws.
    difficulty = rng.normal(size=300)
    a, b = difficulty + 0.1, difficulty + rng.normal(scale=0.1, size=300)
    paired = paired_bootstrap(a - b, resamples=2000)
    unpaired = bootstrap_statistic(
        lambda i: a[i].mean() - b[rng.integers(0, 300, 300)].mean(), 300, resamples=2000
    )
    assert paired[0] < (a - b).mean() < paired[1] and abs((a - b).mean() - 0.1) < 0.03
    assert (paired[1] - paired[0]) * 5 < unpaired[1] - unpaired[0]
    with pytest.raises(ValueError, match="one-dimensional"):
        paired_bootstrap(np.zeros((2, 2)))
