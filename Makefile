# The README's Quickstart: `make train` (set up, then train on the embedded
# default) and `make test`.  Both set up first (scripts/quickstart.sh), skipping
# what is already done.  ARGS passes extra arguments: make train ARGS="--epochs 2".
.PHONY: train test setup
train:
	bash scripts/quickstart.sh train $(ARGS)
test:
	bash scripts/quickstart.sh test $(ARGS)
setup:
	bash scripts/quickstart.sh setup
