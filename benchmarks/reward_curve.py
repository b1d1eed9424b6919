"""The reward head's learning curve: held-out pair accuracy against the number of training pairs.

    python benchmarks/reward_curve.py --json runs/reward_curve/curve.json
    python benchmarks/reward_curve.py --sizes 250,500,1000,2000,all --recipe_sizes 400,all --json runs/reward_curve/curve.json
    python benchmarks/reward_curve.py --layers all --json runs/reward_curve/layers.json

Two curves, both scored on the held-out pairs of the SFT config's ``eval_path`` (the demo's 100):

- **refit**: one Hydra-SFT checkpoint (the SFT config's recipe, made once in ``<output_dir>/sft`` unless
  ``--sft_dir`` names one). Every training and held-out pair goes through it once, without the LM head, and the
  hidden states the config's ``reward_layer`` names (the final ones where it is empty) are pooled three ways
  (``last``, ``mean``, ``sum``). For each size N the reward head is
  refit on the first N training pairs (``hydra_rlhf.model.head_fits.fit_reward_head``: L2 logistic regression, its strength
  picked by 5-fold cross-validation) and scored on the held-out pairs. One forward per pair, whatever the sizes.
  ``--margins 0.1,0.2`` adds the same for the shipped pooling on only the pairs whose judge scores differ by at
  least each margin (near-ties are the noisiest labels; ``min_score_margin`` in the SFT config).
- **layers** (``--layers 0,1,12,final`` or ``all``): the same forward also keeps the hidden states after each of
  these layers (``final``: the last norm's output); a head with the shipped pooling is refit on every training pair
  at each, its cross-validated accuracy (the figure to choose a layer by) and held-out accuracy reported.
- **recipe**: the whole Hydra-SFT recipe (joint LM + reward training over N pairs, then its refit) at each of
  ``--recipe_sizes`` (none by default: one training step per ``batch_size`` pairs), its held-out reward accuracy
  and wall time; the runs go to ``<output_dir>/recipe/<N>``, and ``--reuse`` reads finished ones back.

The training pairs are taken in file order: the bundled file has one pair per prompt first, then the second round.
``--sft_set key=value`` passes a flag to every SFT run (the tests shrink everything to a tiny model with it).
"""

import argparse
import json
import sys
from pathlib import Path

from hydra_rlhf.experiments import as_flags, ensure_sft, run_script, write_json
from hydra_rlhf.memory.profiler import wide_console

POOLINGS = ("last", "mean", "sum")


def parse_sizes(text: str, flag: str, parser) -> list:
    """"250,500,all" -> [250, 500, "all"]."""
    sizes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item != "all" and not (item.isdigit() and int(item) > 0):
            parser.error(f"{flag}: {item!r} is neither a positive number of pairs nor 'all'")
        sizes.append(item if item == "all" else int(item))
    return sizes


def sft_settings(sft_config: str, overrides: list[str]):
    """The SFT config as the recipe reads it, with the ``--sft_set`` overrides applied."""
    from trl import TrlParser

    from hydra_rlhf.config import ModelConfig
    from hydra_rlhf.sft import SFTConfig

    return TrlParser((ModelConfig, SFTConfig)).parse_args_and_config(["--config", sft_config, *overrides])[1]


def pair_accuracy(head, chosen, rejected) -> float:
    """Held-out pairs the head ranks right, a tie counting half (as ``hydra_rlhf.sft.evaluate_sft``)."""
    import torch

    with torch.no_grad():
        margin = (head(chosen) - head(rejected)).squeeze(-1)
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def fit_and_score(train: tuple, held_out: tuple, indices) -> tuple[float, float]:
    """(held-out accuracy, cross-validated accuracy) of a head refit on the training pairs at ``indices``."""
    import torch

    from hydra_rlhf.model.head_fits import fit_reward_head

    chosen, rejected = train
    head = torch.nn.Linear(chosen.shape[1], 1)
    fit = fit_reward_head(head, chosen[indices], rejected[indices])
    return pair_accuracy(head, *held_out), fit["cv_accuracy"]


def parse_layers(text: str, parser) -> list:
    """"0,1,final" -> [0, 1, None]; "all" -> every layer and the final states (the model's depth decides)."""
    layers = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item not in ("all", "final") and not item.isdigit():
            parser.error(f"--layers: {item!r} is neither a layer number, 'final' nor 'all'")
        layers.append(None if item == "final" else item if item == "all" else int(item))
    return layers


def refit_curve(sft_dir: Path, config, sizes: list, margins: list[float], layers: list) -> dict:
    """Held-out accuracy of a head refit on the first N training pairs, per pooling, on one checkpoint's features
    at the shipped layer; for the shipped pooling, on the first N of the pairs whose judge scores differ by at least
    each margin; and refit on every training pair at each of ``layers``."""
    from hydra_rlhf.data import load_preferences, message_text
    from hydra_rlhf.model.loading import load_causal_lm, load_tokenizer
    from hydra_rlhf.model.heads import check_reward_layer
    from hydra_rlhf.sft import encode_pairs, pooled_features

    def load(path, margin=0.0):
        pairs, _ = load_preferences(path, config.prompt_column, config.chosen_column, config.rejected_column,
                                    min_score_margin=margin)
        return pairs

    key = lambda pair: tuple(message_text(pair[k]) for k in ("prompt", "chosen", "rejected"))  # noqa: E731
    tokenizer = load_tokenizer(str(sft_dir))
    train_pairs = load(config.train_path)
    splits = {name: encode_pairs(tokenizer, pairs, config)[0]
              for name, pairs in (("train", train_pairs), ("eval", load(config.eval_path)))}
    lm = load_causal_lm(str(sft_dir))
    depth = lm.config.num_hidden_layers
    layers = [*range(depth + 1), None] if "all" in layers else layers
    for layer in layers:
        check_reward_layer(layer, depth, "--layers")
    shipped_layer = config.reward_layer
    read = tuple(dict.fromkeys([shipped_layer, *layers]))
    by_layer = {name: pooled_features(lm, rows, tokenizer.pad_token_id, config.eval_batch_size, POOLINGS, read)
                for name, rows in splits.items()}
    features = {name: by_layer[name][shipped_layer] for name in splits}
    total = len(splits["train"])
    count = lambda size, available: available if size == "all" else min(size, available)  # noqa: E731
    curve = {"sizes": sizes, "pairs": [count(size, total) for size in sizes], **{p: [] for p in POOLINGS},
             "cv": {p: [] for p in POOLINGS}}
    for n in curve["pairs"]:
        for pooling in POOLINGS:
            accuracy, cv = fit_and_score(features["train"][pooling], features["eval"][pooling], slice(0, n))
            curve[pooling].append(accuracy)
            curve["cv"][pooling].append(cv)
        print(f"refit on {n} pairs: " + ", ".join(f"{p} {curve[p][-1]:.1%}" for p in POOLINGS), flush=True)
    shipped = config.reward_pooling
    position = {key(pair): i for i, pair in enumerate(train_pairs)}
    by_margin = []
    for margin in margins:
        indices = [position[key(pair)] for pair in load(config.train_path, margin)]
        row = {"min_margin": margin, "pairs_available": len(indices), "pairs": [], "accuracy": [], "cv": []}
        for n in dict.fromkeys(count(size, len(indices)) for size in sizes):
            accuracy, cv = fit_and_score(features["train"][shipped], features["eval"][shipped], indices[:n])
            row["pairs"].append(n)
            row["accuracy"].append(accuracy)
            row["cv"].append(cv)
        by_margin.append(row)
        print(f"margin >= {margin}: " + ", ".join(f"{n} pairs {a:.1%}" for n, a in zip(row["pairs"], row["accuracy"])),
              flush=True)
    by_layer_rows = []
    for layer in layers:
        accuracy, cv = fit_and_score(by_layer["train"][layer][shipped], by_layer["eval"][layer][shipped], slice(0, total))
        by_layer_rows.append({"layer": "final" if layer is None else layer, "accuracy": accuracy, "cv": cv})
        print(f"layer {by_layer_rows[-1]['layer']}: held-out {accuracy:.1%}, CV {cv:.1%}", flush=True)
    return {**curve, "by_margin": by_margin, "by_layer": by_layer_rows, "train_pairs": total,
            "eval_pairs": len(splits["eval"]), "checkpoint": str(sft_dir), "shipped_pooling": shipped,
            "shipped_layer": "final" if shipped_layer is None else shipped_layer}


def recipe_curve(args, sizes: list) -> list[dict]:
    """The whole Hydra-SFT recipe at each size: held-out reward accuracy, the refit's CV accuracy, wall time."""
    rows = []
    for size in sizes:
        output = args.output_dir / "recipe" / str(size)
        summary_file = output / "sft_summary.json"
        if not (args.reuse and summary_file.is_file()):
            print(f"Hydra-SFT on {size} pairs ...", flush=True)
            limit = [] if size == "all" else ["--max_train_pairs", str(size)]
            run_script(["recipes/sft.py", "--config", args.sft_config, "--output_dir", str(output),
                        "--overwrite_output_dir", "true", *as_flags(args.sft_set), *limit])
        summary = json.loads(summary_file.read_text())
        rows.append({"size": size, "pairs": summary["train_pairs"], "steps": summary["steps"],
                     "reward_head_accuracy": summary["eval"]["reward_accuracy"],
                     "perplexity": summary["eval"]["perplexity"],
                     "cv_accuracy": summary["reward_head_fit"].get("cv_accuracy"),
                     "refit_features": summary["reward_head_fit"].get("features", "training"),
                     "wall_seconds": summary["wall_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(console, title: str, columns, rows) -> None:
    """One rich table, every column right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_tables(results: dict) -> None:
    console = wide_console()
    refit = results["refit"]
    print_table(console, f"Reward head refit on the first N training pairs: held-out accuracy ({refit['eval_pairs']} "
                         f"pairs; features of {refit['checkpoint']}, layer {refit['shipped_layer']})",
                ("pairs", *(f"{p}{' (shipped)' if p == refit['shipped_pooling'] else ''}" for p in POOLINGS)),
                ((str(n), *(f"{refit[p][i]:.1%} (CV {refit['cv'][p][i]:.1%})" for p in POOLINGS))
                 for i, n in enumerate(refit["pairs"])))
    if refit["by_margin"]:
        print_table(console, f"The {refit['shipped_pooling']} head refit on the first N pairs whose judge scores differ "
                             "by at least a margin: held-out accuracy",
                    ("min margin", "pairs available", "first N pairs: held-out accuracy (CV)"),
                    ((f"{row['min_margin']:g}", str(row["pairs_available"]),
                      ", ".join(f"{n}: {a:.1%} ({cv:.1%})" for n, a, cv in zip(row["pairs"], row["accuracy"], row["cv"])))
                     for row in refit["by_margin"]))
    if refit["by_layer"]:
        print_table(console, f"The {refit['shipped_pooling']} head refit on all {refit['train_pairs']} training pairs, "
                             "per layer it reads", ("layer", "CV accuracy", "held-out accuracy"),
                    ((f"{row['layer']}{' (shipped)' if row['layer'] == refit['shipped_layer'] else ''}",
                      f"{row['cv']:.1%}", f"{row['accuracy']:.1%}") for row in refit["by_layer"]))
    if results["recipe"]:
        print_table(console, "The whole Hydra-SFT recipe on the first N pairs",
                    ("pairs", "steps", "held-out accuracy", "CV accuracy", "perplexity", "wall"),
                    ((str(r["pairs"]), str(r["steps"]), f"{r['reward_head_accuracy']:.1%}",
                      f"{r['cv_accuracy']:.1%}" if r["cv_accuracy"] is not None else "-", f"{r['perplexity']:.2f}",
                      f"{r['wall_seconds']:.0f} s") for r in results["recipe"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_config", default="recipes/configs/sft_smollm2.yaml")
    parser.add_argument("--sizes", default="250,500,1000,2000,all", help="Training pairs per refit, comma-separated "
                        "('all': every pair).")
    parser.add_argument("--margins", default="", help="Also refit the shipped pooling's head on only the pairs whose "
                        "judge scores differ by at least each of these, comma-separated (needs the score columns).")
    parser.add_argument("--layers", default="", help="Also refit on every training pair at each of these layers, "
                        "comma-separated: N reads the hidden states after N layers, 'final' the last norm's output, "
                        "'all' every layer and final.")
    parser.add_argument("--recipe_sizes", default="", help="Training pairs per whole Hydra-SFT run, comma-separated "
                        "(default: none).")
    parser.add_argument("--sft_dir", type=Path, help="The Hydra-SFT checkpoint whose features the refit curve reads "
                        "(made by the SFT config where absent; default: <output_dir>/sft).")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/reward_curve"))
    parser.add_argument("--sft_set", action="append", default=[], metavar="KEY=VALUE", help="A flag for the SFT runs.")
    parser.add_argument("--reuse", action="store_true", help="Read recipe runs already finished in output_dir.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes, "--sizes", parser)
    recipe_sizes = parse_sizes(args.recipe_sizes, "--recipe_sizes", parser)
    layers = parse_layers(args.layers, parser)
    if not sizes:
        parser.error("--sizes: give at least one size")
    try:
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
    except ValueError:
        parser.error(f"--margins takes comma-separated numbers, got {args.margins!r}")
    sft_dir = args.sft_dir or args.output_dir / "sft"
    ensure_sft(sft_dir, args.sft_config, as_flags(args.sft_set), "hydra")
    config = sft_settings(args.sft_config, as_flags(args.sft_set))
    results = {"sft_config": args.sft_config, "sft_set": args.sft_set,
               "refit": refit_curve(sft_dir, config, sizes, margins, layers),
               "recipe": recipe_curve(args, recipe_sizes)}
    print_tables(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
