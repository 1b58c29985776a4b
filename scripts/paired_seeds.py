"""Tables over training seeds: each schedule's FID and losses as mean ± sd, and its gap to standard QAT paired
seed by seed, with a Student-t interval that says whether the gap can be told from seed noise.

The rows are per-seed measurements (one trained and evaluated student each) keyed by `ARM`; the benchmark
(`scripts/compare_schedules.py`) and its saved `per_seed.json` files feed them. The names come from `conf/`:
models, schedules and granularities are the presets there, shown in the order below where one is given."""

from __future__ import annotations

import math
import statistics
from importlib import resources

from fraqat_cli.evaluate.comparison import plain_qat
from fraqat_cli.evaluate.intervals import CONFIDENCE, t_interval
from fraqat_cli.models.toy import TEACHERS
from fraqat_cli.quant.spec import ROUNDINGS


def presets(group: str, first: list[str]) -> list[str]:
    """The preset names of `conf/<group>/` (internal `_` ones aside): `first` in its order, then the rest by name."""
    names = {f.name.removesuffix(".yaml") for f in (resources.files("fraqat_cli.conf") / group).iterdir()
             if f.name.endswith(".yaml") and not f.name.startswith("_")}
    return [n for n in first if n in names] + sorted(names - set(first))


SCHEDULES = presets("schedule", ["fp", "standard", "simple", "integer", "fractional", "cosine", "linear",
                                 "standard_w3", "fractional_w3"])
METHOD_NAMES = {"standard": "standard QAT", "fractional": "FraQAT", "standard_w3": "standard QAT (W3)",
                "fractional_w3": "FraQAT (W3)"}
MODELS = list(TEACHERS)  # the toy teachers the benchmarks train on (conf/model/toy*.yaml)
GRANULARITIES = [g for g in presets("quantizer", ["per_tensor", "per_channel"]) if g != "per_group"]
# Which weights are quantized, by name: `selection=` (which layers) and `quantizer.layers` (which kinds) together.
SELECTIONS = {
    "transformer_blocks": ["selection=transformer_blocks"],  # the default: linear layers inside the blocks
    "all_linear": ["selection=all_linear"],  # the paper's: every linear layer
    "all_linear_conv": ["selection=all_linear", "quantizer.layers=[linear,pointwise_conv]"],  # + the 1x1 convs
    "transformer_blocks_conv": ["selection=transformer_blocks", "quantizer.layers=[linear,pointwise_conv]"],
}
ARM = ("model", "selection", "rounding", "schedule", "granularity")  # what a row's seeds are grouped by
# A rounding that emits another's codes at integer bits (tests/test_fake_quant.py checks it) has that rounding's
# `standard` (4-bit from the first step) students: a sweep need not train them twice.
SAME_AT_INTEGER_BITS = {"nearest_int_range": "nearest"}
EXTRA = {"validation_loss": "validation loss (training's hold-out)", "fid_val": "FID vs validation images",
         "attribute_accuracy": "attribute accuracy"}


def rank(value: str, known: list[str]) -> tuple:
    """Sort key: the names in `known` in its order, then any other by name."""
    return (known.index(value), "") if value in known else (len(known), value)


# The interval of per-seed paired gaps is the t interval of their mean.
paired_interval = t_interval


def paired_p_value(values: list[float]) -> float:
    """Two-sided one-sample t test of per-seed paired gaps against 0 (the test `paired_interval` inverts: the
    interval excludes 0 exactly when p < 1 - CONFIDENCE). Gaps without spread: 0 when they are not all 0."""
    from scipy import stats

    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(len(values))), len(values) - 1))


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of a set of p-values: calling every adjusted p below 0.05 "distinguishable"
    keeps the chance of any false call in the whole set at 5%, where each raw interval alone keeps it per gap."""
    adjusted, running = {}, 0.0
    for i, key in enumerate(sorted(p_values, key=p_values.get)):
        running = max(running, min(1.0, (len(p_values) - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


def adjusted_per_schedule(p_values: dict[tuple, float]) -> dict[tuple, tuple[float, int]]:
    """Holm within each family of claims "this schedule beats standard QAT": the gaps of one schedule (and
    selection, rounding) over every model and granularity. Per arm: (adjusted p, size of its family)."""
    families: dict[tuple, dict] = {}
    for key, p in p_values.items():
        _, selection, rounding, schedule, _ = key
        families.setdefault((selection, rounding, schedule), {})[key] = p
    return {key: (p, len(family)) for family in families.values() for key, p in holm(family).items()}


def fid_gap_p_values(rows: list[dict]) -> dict[tuple, float]:
    """Per arm with a standard-QAT baseline and two or more seed pairs: the p-value of its paired FID gap."""
    groups = _by_seed(rows)
    gaps = {key: _paired_gaps(groups, key, base, "fid") for key in groups
            if (base := _baseline(groups, key)) is not None}
    return {key: paired_p_value(values) for key, values in gaps.items() if len(values) > 1}


def arm(row: dict) -> tuple:
    return tuple(row[k] for k in ARM)


def _by_seed(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """rows keyed by ARM (model, selection, rounding, schedule, granularity) -> seed -> row."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault(arm(r), {})[r["seed"]] = r
    return groups


def order(key: tuple) -> tuple:
    model, selection, rounding, schedule, granularity = key
    return (rank(model, MODELS), rank(selection, list(SELECTIONS)), rank(granularity, GRANULARITIES),
            rank(rounding, list(ROUNDINGS)), rank(schedule, SCHEDULES))


def _baseline(groups: dict, key: tuple) -> tuple | None:
    """The plain-QAT arm a key's gap is measured against (`standard`, or `standard_w3` for `*_w3` schedules): same
    model, selection, rounding and granularity (a rounding equal to another at integer bits borrows that one's
    runs)."""
    model, selection, rounding, schedule, granularity = key
    for candidate in (rounding, SAME_AT_INTEGER_BITS.get(rounding)):
        base = (model, selection, candidate, plain_qat(schedule), granularity)
        if candidate and base in groups and schedule not in (plain_qat(schedule), "fp"):
            return base
    return None


def _interval_cells(values: list[float], percent: bool) -> str:
    mean, sd, low, high = paired_interval(values)
    f = (lambda v: f"{v:+.1%}") if percent else (lambda v: f"{v:.3f}")  # noqa: E731
    if math.isnan(sd):
        return f"{f(mean)} | - | - | one seed: no interval |"
    null = 0 if percent else 1  # no gap; no ratio
    verdict = f"no (interval holds {null})" if low <= null <= high else "**yes**"
    spread = f"{sd:.1%}" if percent else f"{sd:.3f}"
    return f"{f(mean)} | {spread} | [{f(low)}, {f(high)}] | {verdict} |"


def _paired_gaps(groups: dict, key: tuple, base: tuple, measure: str) -> list[float]:
    seeds, baseline = groups[key], groups[base]
    return [seeds[s][measure] / baseline[s][measure] - 1 for s in sorted(seeds.keys() & baseline.keys())]


def _spread(values: list[float], digits: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{digits}} ± {sd:{digits}}"


def family_table(model: str, rows: list[dict], teacher: dict | None, adjusted: dict | None = None) -> str:
    """One model's rows in the form of the paper's Table 1: the teacher, then every schedule per granularity
    (and selection, rounding where they vary), FID vs teacher with its paired gap to standard QAT, how many
    seeds' students came out closer to the teacher than their standard-QAT twin, and the gap's p-value
    Holm-adjusted within its schedule's family of gaps (`adjusted`, from `adjusted_per_schedule`)."""
    adjusted = adjusted or {}
    groups = _by_seed(rows)
    varying = [f for f in ("selection", "rounding") if len({r[f] for r in rows}) > 1]
    extra = [k for k in EXTRA if all(k in r for r in rows)]
    share = all("quantized_share" in r for r in rows)
    head = ["model", *varying, "granularity", "method", "seeds", "FID vs teacher mean ± sd",
            "gap to standard QAT (paired)", f"{CONFIDENCE:.0%} interval", "distinguishable from 0",
            "seeds closer than standard QAT", "p, Holm (gaps in family)", "held-out loss mean ± sd",
            *(EXTRA[k] for k in extra)] + (["weights quantized"] if share else [])
    table = [head]
    if teacher is not None:
        reference = {k: f"{teacher[k]:.3g}" for k in ("fid_val", "attribute_accuracy") if k in teacher}
        table.append([model, *["-"] * len(varying), "-", "teacher (full precision)", "-", "0 (reference)", "-", "-",
                      "-", "-", "-", "0", *(reference.get(k, "-") for k in extra)] + (["-"] if share else []))
    for key in sorted(groups, key=order):
        seeds = groups[key]
        base, gap = _baseline(groups, key), ["-"] * 5
        if base is not None:
            gaps = _paired_gaps(groups, key, base, "fid")
            mean, sd, low, high = paired_interval(gaps)
            closer = f"{sum(g < 0 for g in gaps)}/{len(gaps)}"
            p = f"{adjusted[key][0]:.3f} ({adjusted[key][1]})" if key in adjusted else "-"
            gap = [f"{mean:+.1%}", "one seed: no interval", "-", closer, p] if math.isnan(sd) else [
                f"{mean:+.1%}", f"[{low:+.1%}, {high:+.1%}]", "no" if low <= 0 <= high else "**yes**", closer, p]
        column = lambda k, seeds=seeds: [r[k] for r in seeds.values()]  # noqa: E731
        table.append([model, *(key[ARM.index(f)] for f in varying), key[4], METHOD_NAMES.get(key[3], key[3]),
                      str(len(seeds)), _spread(column("fid"), ".2f"), *gap, _spread(column("held_out_loss"), ".5f"),
                      *(_spread(column(k), ".3g") for k in extra)]
                     + ([f"{statistics.fmean(column('quantized_share')):.1%}"] if share else []))
    lines = ["| " + " | ".join(row) + " |" for row in table]
    lines.insert(1, "|" + "---|" * len(head))
    return "\n".join(lines)


def _ratio_table(groups: dict, field: str) -> list[str]:
    """FID(A) / FID(B) per seed between the values of `field` (rounding or selection), all else equal."""
    i = ARM.index(field)
    values = sorted({k[i] for k in groups}, key=lambda v: rank(v, list(ROUNDINGS) + list(SELECTIONS)))
    if len(values) < 2:
        return []
    # schedule and granularity always; model, selection or rounding when they vary
    varies = lambda f: len({k[ARM.index(f)] for k in groups}) > 1  # noqa: E731
    shown = [f for f in ARM if f != field and (f in ("schedule", "granularity") or varies(f))]
    lines = ["", f"FID ratio between {field}s (same {', '.join(shown)} and seed), paired over seeds: per seed "
             f"FID(A) / FID(B), mean, sd and {CONFIDENCE:.0%} t interval.", "",
             f"| {' | '.join(shown)} | A / B | pairs | ratio mean | sd | 95% interval | "
             "distinguishable from 1 |", "|" + "---|" * (len(shown) + 6)]
    rest = sorted({k[:i] + k[i + 1:] for k in groups}, key=lambda r: order(r[:i] + (values[0],) + r[i:]))
    for others in rest:
        for j, a in enumerate(values):
            for b in values[j + 1:]:
                ka, kb = others[:i] + (a,) + others[i:], others[:i] + (b,) + others[i:]
                if ka not in groups or kb not in groups or ka[3] == "fp":  # fp: FID 0 either way
                    continue
                common = sorted(groups[ka].keys() & groups[kb].keys())
                ratios = [groups[ka][s]["fid"] / groups[kb][s]["fid"] for s in common]
                cells = [ka[ARM.index(f)] for f in shown]
                lines.append(f"| {' | '.join(cells)} | {a} / {b} | {len(ratios)} | "
                             + _interval_cells(ratios, percent=False))
    return lines


def detail_tables(rows: list[dict]) -> str:
    """Per-group means, paired gaps to `standard` and the FID ratios between roundings, for one model and
    selection (the tables of the rounding benchmark)."""
    groups = _by_seed(rows)
    mean = lambda key, k: statistics.fmean(r[k] for r in groups[key].values())  # noqa: E731
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    extra = [k for k in ("fid_val", "attribute_accuracy", "validation_loss") if all(k in r for r in rows)]
    names = {"fid_val": "FID vs validation images", "attribute_accuracy": "attribute accuracy",
             "validation_loss": "validation loss (training's hold-out)"}
    lines = ["| rounding | schedule | granularity | seeds | FID vs teacher mean ± sd | vs standard | "
             + "".join(f"{names[k]} | " for k in extra) + "held-out loss mean ± sd |",
             "|---|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    gaps = ["", f"Gap to `standard` (same rounding and granularity), paired over seeds: per seed "
            f"value(schedule) / value(standard) - 1, mean, sd and {CONFIDENCE:.0%} t interval.", "",
            "| rounding | schedule | granularity | measure | pairs | gap mean | sd | 95% interval | "
            "distinguishable from 0 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=order):
        _, _, rounding, schedule, granularity = key
        seeds = groups[key]
        fid = [r["fid"] for r in seeds.values()]
        loss = [r["held_out_loss"] for r in seeds.values()]
        base, gap = _baseline(groups, key), "-"
        if base is not None:
            label = rounding if base[2] == rounding else f"{rounding} (standard: {base[2]}'s runs)"
            gap = f"{(statistics.fmean(fid) - mean(base, 'fid')) / mean(base, 'fid'):+.1%}"
            measures = [("fid", "FID vs teacher"), ("held_out_loss", "held-out loss")]
            measures += [("validation_loss", "validation loss")] if "validation_loss" in extra else []
            for measure, name in measures:
                paired = _paired_gaps(groups, key, base, measure)
                gaps.append(f"| {label} | {schedule} | {granularity} | {name} | {len(paired)} | "
                            + _interval_cells(paired, percent=True))
        cells = "".join(f"{mean(key, k):.3g} ± {sd([r[k] for r in seeds.values()]):.2g} | " for k in extra)
        lines.append(f"| {rounding} | {schedule} | {granularity} | {len(fid)} | {statistics.fmean(fid):.2f} ± "
                     f"{sd(fid):.2f} | {gap} | {cells}{statistics.fmean(loss):.5f} ± {sd(loss):.5f} |")
    if len(gaps) > 5:
        lines += gaps
    lines += _ratio_table(groups, "rounding")
    return "\n".join(lines)


def summarize(rows: list[dict], teachers: list[dict] = ()) -> str:
    """Every table: per model the Table-1 form, then per model and selection the detail tables, then the FID
    ratios between selections. One model and one selection: the detail tables alone carry no heading."""
    models = sorted({arm(r)[0] for r in rows}, key=lambda m: rank(m, MODELS))
    sections = sorted({arm(r)[:2] for r in rows}, key=lambda s: (rank(s[0], MODELS), rank(s[1], list(SELECTIONS))))
    parts, adjusted = [], adjusted_per_schedule(fid_gap_p_values(rows))
    for model in models:
        teacher = next((t for t in teachers if t["model"] == model), None)
        parts += [f"Model `{model}`: the paper's Table 1 form (FID against the teacher's own images; gap: per seed "
                  f"FID / FID(standard QAT) - 1, {CONFIDENCE:.0%} t interval over the seed pairs; p: the paired t "
                  f"test's, Holm-adjusted over the same schedule's FID gaps in every model and granularity).", "",
                  family_table(model, [r for r in rows if arm(r)[0] == model], teacher, adjusted), ""]
    for model, selection in sections:
        if len(sections) > 1:
            parts += [f"Details, model `{model}`, selection `{selection}`:", ""]
        parts += [detail_tables([r for r in rows if arm(r)[:2] == (model, selection)]), ""]
    for model in models:
        parts += _ratio_table(_by_seed([r for r in rows if arm(r)[0] == model]), "selection")
    return "\n".join(parts).rstrip()

