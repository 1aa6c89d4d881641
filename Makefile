# Two commands do everything on a fresh machine: `make setup` then `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test test-fast lint train bench bench-sweep bench-tuning bench-sal bench-deep bench-g2p bench-projector bench-step-time bench-all report results clean

# benchmarks skip the cells already recorded in their results.csv (a fresh clone has only those);
# FRESH=--fresh reruns them: `make bench FRESH=--fresh` regenerates every committed number
FRESH ?=

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || ! command -v chromium >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium) || \
	  echo "WARNING: could not install dataset-fashion-mnist chromium (need root: sudo apt-get install dataset-fashion-mnist chromium)"; fi

# everything CI runs: the linter, then every test (slow ones included)
test: lint
	$(BIN)/python -m pytest -q

# the edit-test loop: the same minus the tests marked slow (Ray, sweep resume, multi-process)
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check src tests benchmarks examples

train:
	$(BIN)/locosnn train --rule bptt --dataset fashion-mnist --arch 784-500-500-10 --epochs 10 --out runs/bptt-fmnist

# how the sweep's settings were chosen (lr grid, NP/LOCO and SFDFA variants) and the BPTT reference
# on the full training set (benchmarks/tuning.toml; about 75 min on 2 cores, resumable)
bench-tuning:
	$(BIN)/locosnn bench benchmarks/tuning.toml --workers 2 --only lr,perturbation,perturbation_sweep_settings,perturbation_faithful,sfdfa $(FRESH)
	$(BIN)/locosnn bench benchmarks/tuning.toml --workers 1 --threads 2 --only reference $(FRESH)

bench-sal:
	$(BIN)/locosnn sal-demo --out benchmarks/sal --seeds 5 --mode all

# every number README.md, RESULTS.md and docs/ quote, then the pages: about 10 hours on 2 cores
# with FRESH=--fresh (sweep ~1 h, g2p ~25 min, projector ~35 min, deep ~6.5 h, tuning ~1.3 h,
# the 20-epoch deep_d10_long grid included, step time a few minutes); resumable
bench: bench-sweep bench-g2p bench-projector bench-deep bench-tuning bench-sal bench-step-time results
bench-all: bench

# the evidence sweep (accuracy, depth, continual learning, cost): about 1 hour on 2 cores
bench-sweep:
	$(BIN)/locosnn bench benchmarks/sweep.toml --workers 2 --only accuracy,seeds,sal_lr,sal_seeds,depth $(FRESH)
	$(BIN)/locosnn bench benchmarks/sweep.toml --workers 2 --only continual,continual_matched,continual_seeds $(FRESH)
	$(BIN)/locosnn bench benchmarks/sweep.toml --workers 1 --only cost,cost_T $(FRESH)

# the sweep's report (benchmarks/report: report.html, report.md, figures/) and, from the same data,
# RESULTS.md and the results table in README.md; `make report` is the same thing
results:
	$(BIN)/locosnn report benchmarks/sweep benchmarks/g2p --out benchmarks/report --results-md RESULTS.md --readme-table README.md
	$(BIN)/locosnn report benchmarks/deep --grids deep_d10,deep_d10_seeds,deep_d10_seeds_more,deep_d10_seeds_local,deep_d10_long,deep_depth,deep_depth_more,deep_depth_seeds,deep_2layer,deep_2layer_lr,deep_2layer_lr_seeds,deep_full,deep_full_seeds,deep_full_seeds_more,deep_d10_long_floor,deep_floor_lr,deep_options,deep_draws,deep_full_depth,deep_full_long,deep_full_depth_seeds --arch 784-256x10-10 --title "Deep networks" --out benchmarks/deep/report --results-md docs/deep_results.md
	$(BIN)/python benchmarks/deep_ablation.py --dir benchmarks/deep --out docs/deep_ablation.md
	$(BIN)/locosnn report benchmarks/projector --grids projector,projector_kmeans,projector_cheap_k1,projector_inc,projector_inc_r64,projector_tracked,projector_more,projector_parts --title "LOCO projector modes" --out benchmarks/projector/report --results-md docs/projector_results.md
	$(BIN)/locosnn report benchmarks/g2p --grids g2p,g2p_seeds,g2p_lr6,g2p_lr6_loco,g2p_lr6_seeds,g2p_lr6_loco_seeds --arch 189-256-256-53 --out benchmarks/g2p/report --title 'Grapheme-to-phoneme (CMUdict)' --results-md docs/g2p_results.md

# deep networks (docs/deep.md): resumable; the D = 10 grids with 3 seeds take about 1.5 h on 2 cores,
# the ablation and depth grids several more hours, the full-training-set grids (deep_full*) about 4.5 h
bench-deep:
	$(BIN)/python benchmarks/init_rates.py
	$(BIN)/python benchmarks/deep_diag.py
	$(BIN)/locosnn bench benchmarks/deep.toml --workers 2 --only deep_d10,deep_d10_seeds,deep_d10_seeds_more,deep_d10_seeds_local $(FRESH)
	$(BIN)/python benchmarks/deep_probes.py
	$(BIN)/locosnn bench benchmarks/deep.toml --workers 2 --only deep_2layer,deep_2layer_lr,deep_2layer_lr_seeds,deep_depth,deep_depth_more,deep_depth_seeds $(FRESH)
	$(BIN)/locosnn bench benchmarks/deep.toml --workers 2 --only deep_ablation,deep_ablation_init_opt,deep_ablation_adam,deep_d10_long $(FRESH)
	$(BIN)/locosnn bench benchmarks/deep.toml --workers 2 --only deep_full,deep_full_seeds,deep_d10_long_floor,deep_full_seeds_more,deep_floor_lr,deep_options,deep_draws,deep_full_depth,deep_full_long,deep_full_depth_seeds $(FRESH)

# the grapheme-to-phoneme baseline table (docs/g2p.md): 3 seeds x 4 rules and the NP/LOCO lr grids at the full budget, about 45 minutes
bench-g2p:
	$(BIN)/locosnn bench benchmarks/g2p.toml --workers 1 --only g2p,g2p_seeds,g2p_lr6,g2p_lr6_loco,g2p_lr6_seeds,g2p_lr6_loco_seeds $(FRESH)

# LOCO's projector modes (docs/rules.md): 70 cells, about 1.3 hours on 2 cores
bench-projector:
	$(BIN)/locosnn bench benchmarks/projector.toml --workers 2 --only projector,projector_kmeans,projector_cheap_k1,projector_inc,projector_inc_r64,projector_tracked,projector_more,projector_parts $(FRESH)

# step time of every rule beside snnTorch's BPTT (run it on a quiet machine; a few minutes)
bench-step-time:
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/step_time.py --repeats 30


report: results

clean:
	rm -rf $(VENV) runs
