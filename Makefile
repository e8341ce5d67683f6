# landmarks: `make predict` and `make test` are all a fresh clone needs.  `make help` lists the variables.
# Every pipeline target is one call of `landmarks run TARGET`: the stage graph (src/landmarks/stages.py)
# checks the inputs first, then runs the target and the stages it needs in order, each skipping work
# that is already done (fingerprinted outputs), so reruns are cheap.

PYTHON      ?= python3
VENV        ?= .venv
DATA_DIR    ?= data/demo
WORK_DIR    ?= work
# Empty MODEL: the graph's choice, the zero-training models/default with its local head adapted, without
# labels, to DATA_DIR's train images (cached in WORK_DIR/adapt/model).  ADAPT=0 or verify.enabled=false:
# models/default itself.
MODEL       ?=
ADAPT       ?= 1
# Per run: the README's submission/submission.csv for the default WORK_DIR, else WORK_DIR/submission.csv.
SUBMISSION  ?= $(if $(filter work,$(WORK_DIR)),submission/submission.csv,$(WORK_DIR)/submission.csv)
SHARDS      ?=
JOBS        ?=
SCHEDULER   ?=
CONFIG      ?=
SET         ?=
V           ?= 0
HOLDOUT_DIR ?= data/holdout
TRAINED_MODEL ?= models/trained
SHARED_DATA ?= ../shared/data
IMPORT_DIR  ?= data/shared
K           ?= 1
SEED        ?= 0
HARD_DIR    ?= data/hard-k$(K)-s$(SEED)
VARIANT     ?=

# Variables given on the command line must be ours: a typo (DATADIR=) stops here instead of running the demo.
VARIABLES := PYTHON VENV DATA_DIR WORK_DIR MODEL ADAPT SUBMISSION SHARDS JOBS SCHEDULER CONFIG SET V \
             HOLDOUT_DIR TRAINED_MODEL SHARED_DATA IMPORT_DIR K SEED HARD_DIR VARIANT
lc = $(subst A,a,$(subst B,b,$(subst C,c,$(subst D,d,$(subst E,e,$(subst F,f,$(subst G,g,$(subst H,h,$(subst I,i,\
     $(subst J,j,$(subst K,k,$(subst L,l,$(subst M,m,$(subst N,n,$(subst O,o,$(subst P,p,$(subst Q,q,$(subst R,r,\
     $(subst S,s,$(subst T,t,$(subst U,u,$(subst V,v,$(subst W,w,$(subst X,x,$(subst Y,y,$(subst Z,z,$(subst _,,$(subst -,,$1))))))))))))))))))))))))))))
near = $(firstword $(foreach k,$(VARIABLES),$(if $(filter $(call lc,$1),$(call lc,$k)),$k)))
UNKNOWN := $(strip $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $v)),$(if $(filter $v,$(VARIABLES)),,$v))))
ifneq ($(UNKNOWN),)
$(error unknown variable $(firstword $(UNKNOWN))$(if $(call near,$(firstword $(UNKNOWN))),: did you mean $(call near,$(firstword $(UNKNOWN)))?,); `make help` lists the variables)
endif

BIN  := $(VENV)/bin
LM   := $(BIN)/landmarks
INSTALLED := $(VENV)/.installed
DEFAULT_MODEL := models/default
CONFIG_ARGS = $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s)) $(if $(filter 1,$(V)),-v)
RUN_ARGS = --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --submission $(SUBMISSION) $(if $(MODEL),--model $(MODEL)) \
           $(if $(filter 0,$(ADAPT)),--no-adapt) $(if $(SHARDS),--shards $(SHARDS)) $(if $(JOBS),--jobs $(JOBS)) \
           $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(CONFIG_ARGS)
# The model a tool reads: MODEL, else the run's model as the graph chooses it (`landmarks show` etc. do that).
TOOL_ARGS = --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) $(CONFIG_ARGS) \
            $(if $(MODEL),--model $(MODEL),$(if $(filter 0,$(ADAPT)),--model $(DEFAULT_MODEL)))

PIPELINE := demo-data adapted-model features whiten knn local-features verify calibrate predict validate
.PHONY: help install model train adapt $(PIPELINE) validate-hard holdout import import-hard bench cluster-check notebooks docs test clean

help:
	@echo "make predict      demo data + adapted model + features, whiten, knn, local-features, verify, predict -> SUBMISSION"
	@echo "make validate     predict, then the GAP report -> WORK_DIR/report.md"
	@echo "make test         install and run the test suite"
	@echo "pipeline targets (each = landmarks run TARGET): $(PIPELINE)"
	@echo "other targets: install model train adapt validate-hard holdout import import-hard bench cluster-check notebooks docs clean"
	@echo ""
	@echo "variables (make predict VAR=value ...), with their defaults:"
	@echo "  DATA_DIR=$(DATA_DIR)   Kaggle-layout dataset (data/demo is generated)"
	@echo "  WORK_DIR=$(WORK_DIR)   features, indexes, reports, logs/run.log"
	@echo "  SUBMISSION=$(SUBMISSION)   (submission/submission.csv for WORK_DIR=work, else WORK_DIR/submission.csv)"
	@echo "  MODEL=$(MODEL)   DELG SavedModel (empty: models/default with its local head adapted to DATA_DIR)"
	@echo "  ADAPT=$(ADAPT)   0: use models/default as it is"
	@echo "  SHARDS=$(SHARDS) JOBS=$(JOBS) SCHEDULER=$(SCHEDULER)   (empty: extract.shards, extract.jobs, extract.scheduler)"
	@echo "  CONFIG=$(CONFIG)   YAML/TOML config file"
	@echo "  SET=\"$(SET)\"   config overrides, e.g. SET=\"knn.k=50 verify.enabled=false\""
	@echo "  V=$(V)   1: full log on the console"
	@echo "  HOLDOUT_DIR=$(HOLDOUT_DIR) TRAINED_MODEL=$(TRAINED_MODEL) SHARED_DATA=$(SHARED_DATA) IMPORT_DIR=$(IMPORT_DIR)"
	@echo "  K=$(K) SEED=$(SEED) HARD_DIR=$(HARD_DIR) VARIANT=$(VARIANT)   (import-hard, validate-hard)"

install: $(INSTALLED)
$(INSTALLED): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# venvs made before the switch to the `tensorflow` distribution hold tensorflow-cpu (same files)
	$(BIN)/python -m pip uninstall -q -y tensorflow-cpu 2>/dev/null || true
	$(BIN)/python -m pip install -q -c requirements.txt -e ".[dev,cluster]"
	touch $@

# The pipeline: one line per target; the graph runs what the target needs (make adapted-model = stage adapt).
$(PIPELINE): $(INSTALLED)
	@$(LM) run $(if $(filter adapted-model,$@),adapt,$@) $(RUN_ARGS)

model: $(INSTALLED)
	$(LM) model build --out $(DEFAULT_MODEL) $(CONFIG_ARGS)

train: $(INSTALLED) demo-data
	$(LM) train --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) $(CONFIG_ARGS) --out $(TRAINED_MODEL)

# The adapted model, then compared with the zero-training model under known warps -> WORK_DIR/adapt/eval.md.
adapt: $(INSTALLED) demo-data model
	$(LM) adapt --data-dir $(DATA_DIR) --work-dir $(WORK_DIR) --model $(DEFAULT_MODEL) --out $(WORK_DIR)/adapt/model \
	    --replace-stale $(CONFIG_ARGS)

holdout: $(INSTALLED) demo-data
	$(LM) holdout --data-dir $(DATA_DIR) --out $(HOLDOUT_DIR)

# Import the shared real photo sets (Paris + multiview scenes as landmarks, products as distractors).
import: $(INSTALLED)
	$(LM) import $(SHARED_DATA)/paris6k_subset/LABELS.csv $(SHARED_DATA)/multiview_scenes/LABELS.csv \
	    --distractors $(SHARED_DATA)/distractors_products/LABELS.csv --out $(IMPORT_DIR) $(CONFIG_ARGS)

# One split of the hard protocol as a Kaggle-layout dataset (wide-baseline scenes K-shot, Paris and
# multiview scenes as extra train classes, 100 product photos as non-landmarks).
import-hard: $(INSTALLED)
	$(LM) import $(SHARED_DATA)/wide_baseline_scenes/LABELS.csv \
	    --extra-train $(SHARED_DATA)/paris6k_subset/LABELS.csv $(SHARED_DATA)/multiview_scenes/LABELS.csv \
	    --distractors $(SHARED_DATA)/distractors_products/LABELS.csv --distractor-sample 100 \
	    --train-per-class $(K) --seed $(SEED) --heldout-class-fraction 0.2 --out $(HARD_DIR) $(CONFIG_ARGS)

# The hard protocol: K-shot splits (K = 1, 2; 5 seeds each) of the wide-baseline scenes, every
# named setting scored on every split -> WORK_DIR/hard/report.md.  VARIANT="name;name" limits the rows.
# It scores one fixed model on splits it builds itself: MODEL when given, else the zero-training model
# (adapting on DATA_DIR, the demo by default, would not describe these splits).
HARD_MODEL = $(or $(MODEL),$(DEFAULT_MODEL))
validate-hard: $(INSTALLED) $(if $(MODEL),,model)
	$(LM) validate-hard --work-dir $(WORK_DIR) --model $(HARD_MODEL) --set hard.shared_data=$(SHARED_DATA) $(CONFIG_ARGS) \
	    $(if $(VARIANT),--variant "$(VARIANT)")

# Tools that read the run's data and model: the graph brings them up to date first (adapt or model,
# whichever the run uses; the other is off and does nothing).
bench: $(INSTALLED)
	@$(LM) run adapt $(RUN_ARGS) && $(LM) run model $(RUN_ARGS)
	$(LM) bench $(TOOL_ARGS)

# A real Dask cluster on 127.0.0.1 (dask scheduler + 2 dask workers as subprocesses, stopped after):
# shards byte-identical to a local run, and a worker killed mid-run is survived.
cluster-check: $(INSTALLED)
	$(BIN)/python -m pytest -q tests/test_cluster.py

notebooks: $(INSTALLED) demo-data $(if $(MODEL),,model)
	$(BIN)/python -m landmarks.tools.notebooks $(TOOL_ARGS) $(if $(MODEL),,--model $(DEFAULT_MODEL)) --submission $(SUBMISSION) \
	    --out $(WORK_DIR)/notebooks

docs: predict
	@$(LM) run validate $(RUN_ARGS)
	cp $(WORK_DIR)/plots/*.png docs/
	$(LM) show --docs $(TOOL_ARGS) --out docs/show_example.png
	$(BIN)/python docs/make_diagram.py --out docs/pipeline.png

test: $(INSTALLED)
	$(BIN)/ruff check src tests notebooks
	$(BIN)/ruff format --check src tests notebooks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(WORK_DIR) $(SUBMISSION)
