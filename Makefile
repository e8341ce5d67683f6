# landmarks: every stage is a target; `make predict` and `make test` are all a fresh clone needs.
# Stage commands skip work that is already done (fingerprinted shards), so reruns are cheap.

PYTHON      ?= python3
VENV        ?= .venv
DEMO_DIR    ?= data/demo
DATA_DIR    ?= $(DEMO_DIR)
WORK_DIR    ?= work
DEFAULT_MODEL := models/default
# The model of every stage: by default the zero-training model with its local head adapted, without
# labels, on DATA_DIR's train images (a cached stage: `landmarks adapt` skips when its fingerprint of
# model + adapt settings + train images matches).  ADAPT=0 or MODEL=models/default: zero-training.
ADAPT       ?= 1
ADAPTED_MODEL ?= $(WORK_DIR)/adapt/model
MODEL       ?= $(if $(filter 1,$(ADAPT)),$(ADAPTED_MODEL),$(DEFAULT_MODEL))
SUBMISSION  ?= submission/submission.csv
SHARDS      ?= 4
JOBS        ?= 2
SCHEDULER   ?=
CONFIG      ?=
SET         ?=
HOLDOUT_DIR ?= data/holdout
TRAINED_MODEL ?= models/trained

BIN  := $(VENV)/bin
LM   := $(BIN)/landmarks
COMMON = --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --model $(MODEL) --submission $(SUBMISSION) \
         $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))
INSTALLED := $(VENV)/.installed
# Generated inputs are built only when the defaults are in use.
DATA_DEPS  := $(if $(filter $(DEMO_DIR),$(DATA_DIR)),$(DEMO_DIR)/.complete)
MODEL_DEPS := $(if $(filter $(DEFAULT_MODEL),$(MODEL)),$(DEFAULT_MODEL)/saved_model.pb) \
              $(if $(filter $(ADAPTED_MODEL),$(MODEL)),adapted-model)
ADAPT_ARGS  = --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --model $(DEFAULT_MODEL) --out $(ADAPTED_MODEL) \
              --replace-stale $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

.PHONY: help install demo-data model train adapt adapted-model features whiten knn local-features verify calibrate predict validate validate-hard holdout import import-hard bench cluster-check notebooks docs test clean

help:
	@echo "make predict   - demo data + adapted default model + features, whiten, knn, local-features, verify, predict -> $(SUBMISSION)"
	@echo "make test      - install and run the test suite"
	@echo "other targets: install demo-data model train adapt adapted-model features whiten knn local-features verify validate validate-hard holdout import import-hard bench cluster-check notebooks docs clean"

install: $(INSTALLED)
$(INSTALLED): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# venvs made before the switch to the `tensorflow` distribution hold tensorflow-cpu (same files)
	$(BIN)/python -m pip uninstall -q -y tensorflow-cpu 2>/dev/null || true
	$(BIN)/python -m pip install -q -c requirements.txt -e ".[dev,cluster]"
	touch $@

demo-data: $(DEMO_DIR)/.complete
$(DEMO_DIR)/.complete: | $(INSTALLED)
	$(LM) demo-data --out $(DEMO_DIR) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

model: $(DEFAULT_MODEL)/saved_model.pb
$(DEFAULT_MODEL)/saved_model.pb: | $(INSTALLED)
	$(LM) model build --out $(DEFAULT_MODEL) $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))

train: $(INSTALLED) $(DATA_DEPS)
	$(LM) train $(COMMON) --out $(TRAINED_MODEL)

# Label-free local head on DATA_DIR's train images -> ADAPTED_MODEL (the default MODEL).  Always run:
# `landmarks adapt` itself skips in a second when the export's fingerprint matches.
adapted-model: $(INSTALLED) $(DATA_DEPS)
	$(LM) adapt $(ADAPT_ARGS) --no-eval

# The same, then compared with the zero-training model under known warps -> WORK_DIR/adapt/eval.md.
adapt: $(INSTALLED) $(DATA_DEPS) $(DEFAULT_MODEL)/saved_model.pb
	$(LM) adapt $(ADAPT_ARGS)

features: $(INSTALLED) $(DATA_DEPS) $(MODEL_DEPS)
	$(LM) features $(COMMON) --split train --shards $(SHARDS) --jobs $(JOBS) $(if $(SCHEDULER),--scheduler $(SCHEDULER))
	$(LM) features $(COMMON) --split test --shards $(SHARDS) --jobs $(JOBS) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

# One stage, one command: each reads the previous stage's files (WORK_DIR layout: src/landmarks/layout.py)
# and skips itself when its output is up to date.
whiten: features
	$(LM) whiten $(COMMON)

knn: whiten
	$(LM) knn $(COMMON)

local-features: knn
	$(LM) local-features $(COMMON) --jobs $(JOBS) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

verify: local-features
	$(LM) verify $(COMMON)

# P(same landmark | evidence) learned on the train split (used when vote.method=calibrated; else a no-op).
calibrate: verify
	$(LM) calibrate $(COMMON)

predict: calibrate
	$(LM) predict $(COMMON)

validate: predict
	$(LM) validate $(COMMON)

holdout: $(INSTALLED) $(DATA_DEPS)
	$(LM) holdout --data-dir $(DATA_DIR) --out $(HOLDOUT_DIR)

# Import the shared real photo sets (Paris + multiview scenes as landmarks, products as distractors).
SHARED_DATA ?= ../shared/data
IMPORT_DIR  ?= data/shared
CONFIG_ARGS = $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))
import: $(INSTALLED)
	$(LM) import $(SHARED_DATA)/paris6k_subset/LABELS.csv $(SHARED_DATA)/multiview_scenes/LABELS.csv \
	    --distractors $(SHARED_DATA)/distractors_products/LABELS.csv --out $(IMPORT_DIR) $(CONFIG_ARGS)

# One split of the hard protocol as a Kaggle-layout dataset (wide-baseline scenes K-shot, Paris and
# multiview scenes as extra train classes, 100 product photos as non-landmarks).
K    ?= 1
SEED ?= 0
HARD_DIR ?= data/hard-k$(K)-s$(SEED)
import-hard: $(INSTALLED)
	$(LM) import $(SHARED_DATA)/wide_baseline_scenes/LABELS.csv \
	    --extra-train $(SHARED_DATA)/paris6k_subset/LABELS.csv $(SHARED_DATA)/multiview_scenes/LABELS.csv \
	    --distractors $(SHARED_DATA)/distractors_products/LABELS.csv --distractor-sample 100 \
	    --train-per-class $(K) --seed $(SEED) --heldout-class-fraction 0.2 --out $(HARD_DIR) $(CONFIG_ARGS)

# The hard protocol: K-shot splits (K = 1, 2; 5 seeds each) of the wide-baseline scenes, every
# named setting scored on every split -> WORK_DIR/hard/report.md.  VARIANT="name;name" limits the rows.
# It scores one fixed model on splits it builds itself: MODEL when given, else the zero-training model
# (adapting on DATA_DIR, the demo by default, would not describe these splits).
HARD_MODEL = $(if $(filter command line environment environment override,$(origin MODEL)),$(MODEL),$(DEFAULT_MODEL))
validate-hard: $(INSTALLED) $(if $(filter $(DEFAULT_MODEL),$(HARD_MODEL)),$(DEFAULT_MODEL)/saved_model.pb)
	$(LM) validate-hard --work-dir $(WORK_DIR) --model $(HARD_MODEL) --set hard.shared_data=$(SHARED_DATA) $(CONFIG_ARGS) \
	    $(if $(VARIANT),--variant "$(VARIANT)")

bench: $(INSTALLED) $(DATA_DEPS) $(MODEL_DEPS)
	$(LM) bench $(COMMON)

# A real Dask cluster on 127.0.0.1 (dask scheduler + 2 dask workers as subprocesses, stopped after):
# shards byte-identical to a local run, and a worker killed mid-run is survived.
cluster-check: $(INSTALLED)
	$(BIN)/python -m pytest -q tests/test_cluster.py

notebooks: $(INSTALLED) $(DATA_DEPS) $(MODEL_DEPS)
	$(BIN)/python -m landmarks.notebooks $(COMMON) --out $(WORK_DIR)/notebooks

docs: predict
	$(LM) show --docs $(COMMON) --out docs/show_example.png

test: $(INSTALLED)
	$(BIN)/ruff check src tests notebooks
	$(BIN)/ruff format --check src tests notebooks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(WORK_DIR) $(SUBMISSION)
