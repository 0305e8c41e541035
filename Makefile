# Two commands do all set-up on a fresh machine with Python 3.10+ and pip:
#   make demo   install, build the embedded demo dataset, fine-tune, evaluate, export, predict
#   make test   install test dependencies (with the [serve] extra: its tests must run) and run the suite
#               in two processes (pytest-xdist; one test file per process at a time)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# PaddleClas pins numpy 1.24.4: a tiny venv with it lets the suite prove our checkpoints load
# there (tests/test_portable_save.py). Optional: if it cannot be made, that one test skips.
NP1    := $(VENV)-numpy1

.PHONY: demo test install bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test,serve]"
	@# oneDNN's C++ headers for the dense-convolution kernel (ppcls_ft/kernels/onednn_headers.py).
	@# --no-deps: the library itself is the one in Paddle's wheel; the package's dependencies are
	@# a 600 MB SYCL runtime. Optional: without it that kernel is Paddle's convolution.
	$(PY) -m pip install -q --no-deps "onednn-devel==2025.0.1" || echo "onednn-devel not installed: Paddle's dense convolution will serve"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

$(NP1)/.ok:
	( $(PYTHON) -m venv $(NP1) && $(NP1)/bin/python -m pip install -q "numpy==1.24.4" \
	  && touch $@ ) || echo "numpy 1.24.4 venv not available; its test will skip"

test: $(STAMP) $(NP1)/.ok
	PPCLS_FT_NUMPY1_PYTHON=$$(test -f $(NP1)/.ok && echo $(abspath $(NP1))/bin/python) \
	  $(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) $(NP1) output build *.egg-info
