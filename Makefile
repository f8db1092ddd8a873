# The two commands of the README. Everything installs from the project's own files.
.PHONY: env test quickstart

env:
	bash scripts/setup_env.sh

test: env
	bash scripts/run_tests.sh

quickstart: env
	bash scripts/quickstart.sh
