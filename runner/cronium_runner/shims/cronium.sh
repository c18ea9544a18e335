# Cronium runtime helpers for bash (sourced through BASH_ENV by cronium-runner).
# Values are JSON; strings print raw, unknown variables print nothing. See docs/RUNNER.md.
cronium_input() { @BIN@/cronium.input "$@"; }
cronium_output() { @BIN@/cronium.output "$@"; }
cronium_get_variable() { @BIN@/cronium.getVariable "$@"; }
cronium_set_variable() { @BIN@/cronium.setVariable "$@"; }
cronium_set_condition() { @BIN@/cronium.setCondition "$@"; }
cronium_event() { @BIN@/cronium.event "$@"; }
cronium_detach() { @BIN@/cronium.detach "$@"; }
cronium_get_input() { @BIN@/cronium.input "$@"; }
cronium_get_event() { @BIN@/cronium.event "$@"; }
