# The two entry points of the README. Both set everything up first (scripts/setup.sh).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/workbench demo --out report.html

test: setup
	.venv/bin/python -m pytest -q
