"""The Markdown report: base vs fine-tuned metrics with the change, loss curves, example answers."""
from __future__ import annotations

from typing import Any

import pandas as pd

from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import PRIMARY, PROTOCOLS, Protocol
from medqa.evaluation.metrics import answered, decision_key, is_decision_key, key_protocol, text_key
from medqa.evaluation.text_metrics import TEXT_METRICS
from medqa.params import LoraParams
from medqa.report import published

STATISTIC_LABELS = {"accuracy": "Decision accuracy", "macro_f1": "Decision macro-F1",
                    "weighted_f1": "Decision weighted-F1", "none_rate": "No decision found"}
TEXT_ROWS = [(metric.label + ("" if metric.higher_is_better else " (lower is better)"), text_key(metric.name))
             for metric in TEXT_METRICS]


def reported_rows() -> list[tuple[str, str]]:
    """(label, path in the metrics JSON) in the order the table shows them: each decision protocol's
    statistics, the majority class's beside the primary protocol's, each protocol's gain over it where
    the protocol reports one, then the text metrics."""
    rows = []
    for protocol in PROTOCOLS:
        rows += [(f"{STATISTIC_LABELS[stat]} ({protocol.label})", decision_key(protocol.name, stat))
                 for stat in protocol.reported]
        if protocol is PRIMARY:
            rows += [(f"{STATISTIC_LABELS[stat]}: majority class, same questions", decision_key("majority", stat))
                     for stat in ("accuracy", "macro_f1", "weighted_f1")]
        if protocol.over_majority:
            rows += [(f"{STATISTIC_LABELS[stat]} ({protocol.label}) minus the majority class's",
                      decision_key(protocol.name, "over_majority", stat)) for stat in ("accuracy", "macro_f1")]
    return rows + TEXT_ROWS


def is_model_metric(path: str) -> bool:
    """Whether a reported row is a model's own result: not the majority predictor's, nor a model's
    gain over it (those have no paired change and are no hub results)."""
    return not path.startswith(decision_key("majority") + ".") and ".over_majority." not in path


def metric_at(tree: dict, dotted: str) -> Any:
    """The value at a dotted path ("decision.choice.accuracy") of a metrics tree."""
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _with_ci(tree: dict, dotted: str) -> str:
    value = metric_at(tree, dotted)
    parent, leaf = dotted.rsplit(".", 1)
    node = metric_at(tree, parent)
    if f"{leaf}_ci_low" in node:
        return f"{value:.4f} [{node[f'{leaf}_ci_low']:.4f}, {node[f'{leaf}_ci_high']:.4f}]"
    return f"{value:.4f}"


def questions_behind(tree: dict, path: str) -> int:
    """How many test questions a reported row is taken over: every test question for the decisions read
    after the prompt, the sample with generated answers for the text metrics and the protocols that
    read the answer."""
    if not is_decision_key(path):
        return tree["n_answers"]
    return tree["decision"][key_protocol(path)].get("n_questions", tree["n_questions"])


def metrics_table(baseline: dict, finetuned: dict, differences: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """One row per metric: the questions it is taken on, baseline and fine-tuned (with 95% CIs) and the
    paired change (with its CI)."""
    rows = []
    for label, path in reported_rows():
        change = f"{metric_at(finetuned, path) - metric_at(baseline, path):+.4f}" if is_model_metric(path) else ""
        if path in differences:
            _, low, high = differences[path]
            change += f" [{low:+.4f}, {high:+.4f}]"
        rows.append({"metric": label, "questions": str(questions_behind(finetuned, path)),
                     "baseline": _with_ci(baseline, path), "fine-tuned": _with_ci(finetuned, path), "change": change})
    return pd.DataFrame(rows)


def _direction(change: float, low: float, high: float, higher_is_better: bool) -> str:
    """"better" or "worse" where the paired interval excludes 0, else "no clear change"."""
    if low <= 0 <= high:
        return "no clear change"
    return "better" if (change > 0) == higher_is_better else "worse"


def _by_decision(values: dict[str, Any], fmt: str) -> str:
    return " · ".join(fmt.format(values[d]) for d in DECISIONS)


def _answered(section: dict) -> dict[str, int]:
    """How often a protocol gave each decision: its confusion matrix's columns."""
    return {d: sum(row[d] for row in section["confusion"].values()) for d in DECISIONS}


def verdict_table(baseline: dict, finetuned: dict, differences: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """What a reader takes in at once, on every test question: the primary protocol's decision accuracy
    and macro-F1 (each beside always answering the majority decision, and the gain over it, where the
    model stands against a constant), its F1 for each decision and how often it gave each (a model that
    never says "maybe" shows at once); then on the sample with generated answers, ROUGE-L, BERTScore
    F1 and perplexity: before, after, the paired change and which way it went."""
    rows = []
    majority = baseline["decision"]["majority"]

    def row(label: str, n: int, base: str, tuned: str, *, change: str = "", verdict: str = "") -> None:
        rows.append({"": label, "questions": str(n), "base": base, "fine-tuned": tuned, "change": change,
                     "verdict": verdict})

    def add(label: str, path: str, higher_is_better: bool) -> None:
        change, low, high = differences[path]
        row(label, questions_behind(finetuned, path), f"{metric_at(baseline, path):.4f}",
            f"{metric_at(finetuned, path):.4f}", change=f"{change:+.4f} [{low:+.4f}, {high:+.4f}]",
            verdict=_direction(change, low, high, higher_is_better))

    n = finetuned["n_questions"]
    for stat in ("accuracy", "macro_f1"):
        add(f"{STATISTIC_LABELS[stat]} ({PRIMARY.label})", decision_key(PRIMARY.name, stat), True)
        row(f"... always {majority['decision']!r} (the majority class)", n, f"{majority[stat]:.4f}",
            f"{majority[stat]:.4f}")
        gains = [metric_at(tree, decision_key(PRIMARY.name, "over_majority", stat)) for tree in (baseline, finetuned)]
        row("... minus the majority class's", n, f"{gains[0]:+.4f}", f"{gains[1]:+.4f}")
    sections = [tree["decision"][PRIMARY.name] for tree in (baseline, finetuned)]
    row(f"F1 of {' · '.join(DECISIONS)} ({PRIMARY.label})", n,
        *(_by_decision({d: s[f"f1_{d}"] for d in DECISIONS}, "{:.2f}") for s in sections))
    row(f"Answered {' · '.join(DECISIONS)} ({PRIMARY.label})", n, *(_by_decision(_answered(s), "{}") for s in sections))
    for metric in TEXT_METRICS:
        if metric.in_verdict:
            add(metric.label, text_key(metric.name), metric.higher_is_better)
    return pd.DataFrame(rows)


def standing_section(baseline: dict, finetuned: dict, split_strategy: str) -> str:
    """Where this run stands: both models' primary-protocol accuracy and macro-F1 among the published
    results on the same 500 official test questions (`published.PUBLISHED`), best first; where the run
    scored other questions, a line saying it is not comparable."""
    n = finetuned["n_questions"]
    if not published.comparable(split_strategy, n):
        what = (f"{n} test questions of a random split" if split_strategy != "official"
                else f"{n} of the {published.OFFICIAL_TEST_QUESTIONS} official test questions")
        return (f"## Where this run stands\n\nNot comparable with published PubMedQA results: this run scored {what}, "
                f"they report all {published.OFFICIAL_TEST_QUESTIONS} of the official test set "
                "(split.strategy=official, eval.max_samples=null).\n")
    entries = [(p.accuracy, p.system, p.params, p.how, f"{p.accuracy:.1f}",
                "-" if p.macro_f1 is None else f"{p.macro_f1:.1f}", p.source) for p in published.PUBLISHED]
    for label, tree in (("base", baseline), ("fine-tuned", finetuned)):
        section = tree["decision"][PRIMARY.name]
        entries.append((100 * section["accuracy"], f"**this run, {label}**", "", f"{PRIMARY.label} protocol",
                        f"**{100 * section['accuracy']:.1f}**", f"**{100 * section['macro_f1']:.1f}**", "this report"))
    table = pd.DataFrame([dict(zip(("system", "params", "how", "accuracy", "macro-F1", "source"), e[1:]))
                          for e in sorted(entries, key=lambda e: -e[0])])
    return (
        "## Where this run stands\n\n"
        f"Accuracy and macro-F1 (%) on PubMedQA's {published.OFFICIAL_TEST_QUESTIONS} official test questions, "
        "reasoning-required (question and abstract, no long answer), beside published results on the same "
        "questions (sources: docs/evaluation.md).\n\n"
        f"{table.to_markdown(index=False, disable_numparse=True)}\n"
    )


def label_distribution(counts: dict[str, int]) -> str:
    """"yes 27 (56%), no 16 (33%), maybe 5 (10%)"."""
    total = sum(counts.values()) or 1
    return ", ".join(f"{label} {counts.get(label, 0)} ({counts.get(label, 0) / total:.0%})" for label in DECISIONS)


def decisions_csv_text(rows: list[dict]) -> str:
    """Per test question, the reference decision and the primary protocol's: DVC's confusion plot data."""
    frame = pd.DataFrame({"pmid": [r["pmid"] for r in rows],
                          "reference": [r["reference_decision"] for r in rows],
                          "decision": [r[f"decision_{PRIMARY.name}"] for r in rows]})
    return frame.to_csv(index=False)


def _decisions(row: dict) -> str:
    return ", ".join(f"{p.label}: {row.get(f'decision_{p.name}')}" for p in PROTOCOLS)


def examples_table(baseline_rows: list[dict], finetuned_rows: list[dict], n: int) -> str:
    """The first `n` test questions with generated answers, with the reference and both models' answers,
    as Markdown sections."""
    tuned = {r["pmid"]: r for r in finetuned_rows}
    parts = []
    for row in answered(baseline_rows)[:n]:
        other = tuned.get(row["pmid"], {})
        parts.append(
            f"### PMID {row['pmid']}\n\n**Question:** {row['question']}\n\n"
            f"**Reference** ({row['reference_decision']}): {row['reference']}\n\n"
            f"**Base** ({_decisions(row)}): {row['generation'] or '(empty)'}\n\n"
            f"**Fine-tuned** ({_decisions(other)}): {other.get('generation') or '(empty)'}\n"
        )
    return "\n".join(parts)


def fitted_text(protocol: Protocol, result: dict) -> str:
    """What `protocol` fitted for a model, from its metrics ("yes +0.0 · no +1.3 · maybe -0.4 (150
    validation questions)" for the offsets), or "n/a"."""
    return protocol.fit.text(result["decision"][protocol.name])


def fits_note(baseline: dict, finetuned: dict) -> str:
    """What each protocol fitted for the base and the fine-tuned model, for the report's note."""
    return " ".join(f"{p.fit.label}: base {fitted_text(p, baseline)}, fine-tuned {fitted_text(p, finetuned)}."
                    for p in PROTOCOLS if p.fit is not None)


def protocols_note() -> str:
    """What each decision protocol reads, for the report's note."""
    return "; ".join(f"*{p.label}*: {p.scored}" for p in PROTOCOLS)


def describe_run(model_name: str, lora: LoraParams, split_strategy: str) -> str:
    """What was compared, for the report's first line."""
    return f"Model `{model_name}`, LoRA r={lora.r} alpha={lora.alpha}, split `{split_strategy}`"


def render_report(
    baseline: dict, finetuned: dict, differences: dict[str, tuple[float, float, float]], train: dict, *,
    baseline_rows: list[dict], finetuned_rows: list[dict], run: str, n_examples: int, loss_png: str,
    decisions_png: str, standing: str = "", cross_validation: str = "", judge: str = "",
) -> str:
    """The whole report as Markdown; `run` is `describe_run`'s line, `standing` the `standing_section`,
    `cross_validation` the `cv_section`, `judge` the `judge_section`."""
    table = metrics_table(baseline, finetuned, differences).to_markdown(index=False, disable_numparse=True)
    verdict = verdict_table(baseline, finetuned, differences).to_markdown(index=False, disable_numparse=True)
    decision = baseline["decision"]
    return (
        "# PubMedQA: base vs fine-tuned\n\n"
        f"{run}: decisions on {baseline['n_questions']} test questions, long answers generated for "
        f"{baseline['n_answers']} of them (a seeded sample).\n\n"
        f"{verdict}\n\n"
        "*Verdict*: better or worse where the paired 95% bootstrap interval of fine-tuned minus base on the "
        "same questions excludes 0 (lower is better for perplexity). *questions*: how many test questions a "
        "row is taken on.\n\n"
        + (f"{standing}\n" if standing else "") + (f"{cross_validation}\n" if cross_validation else "") +
        "## Every metric, each protocol\n\n"
        f"{table}\n\n"
        "Brackets: 95% bootstrap confidence intervals; for the change, the paired bootstrap interval of "
        "fine-tuned minus baseline on the same questions (an interval that excludes 0 is a real change "
        f"at that level). Decision protocols: {protocols_note()}. {fits_note(baseline, finetuned)} "
        "*Majority class*: always answering the test "
        f"questions' most frequent decision ({decision['majority']['decision']!r}); a model that does not beat "
        "it has learned nothing about the decisions. *Token F1*: SQuAD-style word overlap of the generated "
        "long answer with the reference.\n\n"
        f"Test labels: {label_distribution(decision['labels'])}.\n\n"
        f"## Decisions\n\nWhat each model answered ({PRIMARY.label} protocol) against the reference, per test "
        "question: a model that gives one answer to everything fills one column.\n\n"
        f"![decisions]({decisions_png})\n\n"
        "## Training\n\n"
        f"Best checkpoint at step {train['best_step']} of {train['steps']} "
        f"(validation loss {train['best_val_loss']:.4f}{_from_base(train)}), "
        f"{train['trainable_params']:,} trainable parameters, {train['train_runtime_s']} s.\n\n"
        f"![loss curves]({loss_png})\n\n"
        + (f"{judge}\n\n" if judge else "") +
        "## Example answers\n\n"
        f"{examples_table(baseline_rows, finetuned_rows, n_examples)}"
    )


def _cv_row(label: str, summary: dict, n: int) -> dict[str, str]:
    return {"": label, "questions": str(n),
            "accuracy": f"{summary['accuracy']:.3f} [{summary['accuracy_ci_low']:.3f}, {summary['accuracy_ci_high']:.3f}]",
            "macro-F1": f"{summary['macro_f1']:.3f} [{summary['macro_f1_ci_low']:.3f}, {summary['macro_f1_ci_high']:.3f}]",
            f"F1 {' · '.join(DECISIONS)}": _by_decision({d: summary[f"f1_{d}"] for d in DECISIONS}, "{:.2f}"),
            f"answered {' · '.join(DECISIONS)}": _by_decision(summary["chosen"], "{}")}


def cv_section(cv: dict) -> str:
    """The report's cross-validation section (metrics/cv.json): the out-of-fold estimate of the recipe,
    plain and under the decision rule fitted out of fold, and the test decisions under that rule; "" with
    cross-validation off."""
    if not cv.get("folds"):
        return ""
    n, test = cv["n_questions"], cv["test"]
    table = pd.DataFrame([
        _cv_row(f"out of fold: {PRIMARY.label}", cv["choice"], n),
        _cv_row(f"out of fold: {PRIMARY.label} + rule (fitted on the other folds)", cv["choice_with_rule"], n),
        _cv_row(f"test: {PRIMARY.label} (the verdict above)", test["choice"], test["n_questions"]),
        _cv_row(f"test: {PRIMARY.label} + rule (fitted on every out-of-fold score)", test["choice_with_rule"],
                test["n_questions"]),
    ]).to_markdown(index=False, disable_numparse=True)
    offsets = " · ".join(f"{d} {cv['rule']['offsets'][d]:+.1f}" for d in DECISIONS)
    return (
        f"## Cross-validation: {cv['folds']} folds over {n} non-test questions\n\n"
        "Each fold's adapter is trained as the fine-tuned model is, on the other folds' questions, and scores "
        "its own: every non-test question is scored by a model that never saw it, and no test question is "
        "used. The rule adds offsets to the options' log-likelihoods chosen to maximise macro-F1, so a rare "
        "decision counts as much as a common one; its out-of-fold row fits them on the other folds only.\n\n"
        f"{table}\n\n"
        f"The rule fitted on every out-of-fold score: {offsets}. The test rows are the final model, the "
        "pipeline's fine-tuned model refit on the train split (not the folds' ensemble, which no out-of-fold "
        "score can judge: every question was seen by all fold models but its own), read under that rule; "
        "brackets: 95% bootstrap intervals.\n"
    )


def _from_base(train: dict) -> str:
    """", from 2.4012 for the base model" where the run measured the validation loss at step 0."""
    base = train.get("base_val_loss")
    return f", from {base:.4f} for the base model at step 0" if base is not None else ""


def _interval_text(estimate: dict, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(estimate['mean'])} [{fmt.format(estimate['ci_low'])}, {fmt.format(estimate['ci_high'])}]"


STRONG_JUDGE_PARAMS = 7e9  # judges smaller than this are called weak next to their numbers


def _judge_caveats(result: dict, strong_params: float) -> str:
    """What the reader must know before trusting the judge: its size, and its position consistency."""
    consistency = result["head_to_head"]["position_consistency"]["mean"]
    notes = []
    if result["judge_params"] < strong_params:
        notes.append(
            f"**A weak judge.** `{result['judge']}` has {result['judge_params'] / 1e6:,.0f}M parameters; judges "
            f"below ~{strong_params / 1e9:.0f}B rate answers unreliably, so read these numbers as the stage at work, "
            "not as evidence about the answers (profiles/gpu.args names a 7B judge)."
        )
    if consistency < 0.5:
        notes.append(
            f"**Position-bound.** It picks the same answer in both orders on only {consistency:.0%} of the "
            f"questions and picks the answer shown first in {result['head_to_head']['first_shown_picked']:.0%} "
            "of its verdicts: its head-to-head verdicts follow where an answer stands more than what it says."
        )
    return "\n\n".join(notes)


def _verdict_example(row: dict) -> str:
    def ratings(model: str) -> str:
        return ", ".join(f"{c} {v['score']:.2f}" for c, v in row["ratings"][model].items())

    pair = row["head_to_head"]
    return (
        f"#### PMID {row['pmid']}\n\n**Question:** {row['question']}\n\n"
        f"**Base** ({ratings('baseline')}): {row['answers']['baseline'] or '(empty)'}\n\n"
        f"**Fine-tuned** ({ratings('finetuned')}): {row['answers']['finetuned'] or '(empty)'}\n\n"
        f"**Head to head:** base shown first, P(first is better) = {pair['baseline_first']['p_first']:.2f}; "
        f"fine-tuned shown first, P(first is better) = {pair['finetuned_first']['p_first']:.2f}; "
        f"outcome for the fine-tuned model: {pair['outcome']}.\n"
    )


def judge_section(result: dict, rows: list[dict], png: str, n_examples: int,
                  strong_params: float = STRONG_JUDGE_PARAMS) -> str:
    """The report's judge section: criteria means with the paired change, the head-to-head rates and
    the judge's position consistency, the bar chart, and example verdicts."""
    table = pd.DataFrame([
        {"criterion": criterion, "baseline": _interval_text(v["baseline"]),
         "fine-tuned": _interval_text(v["finetuned"]), "change": _interval_text(v["change"], signed=True)}
        for criterion, v in result["criteria"].items()
    ]).to_markdown(index=False, disable_numparse=True)
    pairs, mass = result["head_to_head"], result["rating_mass"]
    caveats = _judge_caveats(result, strong_params)
    return (
        "## LLM judge\n\n"
        f"Judge `{result['judge']}`, {result['n_questions']} of the {result['n_test_questions']} test questions "
        "with generated answers (a seeded subset).\n\n" + (f"{caveats}\n\n" if caveats else "") +
        "Each answer is rated 1-4 on each criterion; the score is the judge's expected rating (its "
        "probabilities for the tokens 1..4 at the rating position, renormalised). Brackets: 95% bootstrap "
        "intervals; the change is paired (same questions).\n\n"
        f"{table}\n\n"
        f"Probability the judge put on the rating tokens at all: base {mass['baseline']:.2f}, fine-tuned "
        f"{mass['finetuned']:.2f}.\n\n"
        "Head to head, each pair is judged twice, each answer shown first once; orders that disagree count "
        f"as a tie. Fine-tuned vs base: win {_interval_text(pairs['win'])}, tie {_interval_text(pairs['tie'])}, "
        f"loss {_interval_text(pairs['loss'])}. Position consistency (both orders pick the same answer): "
        f"{_interval_text(pairs['position_consistency'])}; the answer shown first was picked in "
        f"{pairs['first_shown_picked']:.0%} of the verdicts.\n\n"
        f"![head to head]({png})\n\n"
        "### Example verdicts\n\n" + "\n".join(_verdict_example(r) for r in rows[:n_examples])
    )
