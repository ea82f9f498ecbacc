"""prealloc.config_file: TOML -> PreallocatorConfig, strictly; and `prealloc check-config`."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from prealloc import AllocationStatus, Prediction, ResourcePreallocator, ResourceType, RuleTranslator
from prealloc.config_file import MAX_FILE_BYTES, ConfigError, check_file, config_from_dict, load_config
from engine_util import GatedStrategy

GOOD = """
id = "editor-host"
name = "EditorPreallocator"
min_confidence = 0.5
capacity = 4096
pending_timeout = 5
default_duration = 60.0
allocation_workers = 2

[headroom]
memory = 0.2

[quotas.per_request]
CUSTOM = 10
[quotas.per_application.editor]
CUSTOM = 15

[translator]
rules_file = "rules.toml"
min_need = { MEMORY = 32 }
sizer = { quantile = 0.8, window = 16 }
"""

RULES = """
[[rule]]
name = "open-editor"
match = { type = "user_action", value = "open_*", target_application = "editor" }
request = [{ resource_type = "CUSTOM", need = 6 }]
"""


def write(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path, text, **files):
    for name, content in files.items():
        write(tmp_path, content, name)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.errors


def test_a_full_file_configures_a_working_allocator(tmp_path):
    write(tmp_path, RULES, "rules.toml")
    config = load_config(write(tmp_path, GOOD))
    assert (config.id, config.name, config.capacity, config.allocation_workers) == \
        ("editor-host", "EditorPreallocator", 4096, 2)
    assert config.headroom == {ResourceType.MEMORY: 0.2}
    assert config.quotas.per_request == {ResourceType.CUSTOM: 10.0}
    assert isinstance(config.translator, RuleTranslator)
    assert config.translator.min_need == {ResourceType.MEMORY: 32.0}
    assert config.translator.sizer.quantile == 0.8 and config.translator.sizer.window == 16
    gate = GatedStrategy(100)
    with ResourcePreallocator(config, allocation_strategies={ResourceType.CUSTOM: gate}) as pre:
        [rid] = pre.handle_prediction(Prediction("p", "user_action", "open_file", 0.9, target_application="editor"))
        assert pre.wait_ready([rid], 10)
        assert pre.get_allocation(rid).status is AllocationStatus.ALLOCATED and gate.held == 6
        # the per-application quota from the file holds: 6 + 6 > 15? no; + 6 again > 15: refused
        [second] = pre.handle_prediction(Prediction("q", "user_action", "open_x", 0.9, target_application="editor"))
        [third] = pre.handle_prediction(Prediction("r", "user_action", "open_y", 0.9, target_application="editor"))
        assert pre.wait_ready([second, third], 10)
        assert gate.held == 12 and pre.get_statistics().failed_allocations == 1


def test_inline_rules_and_the_defaults(tmp_path):
    config = load_config(write(tmp_path, """
        [translator]
        [[translator.rule]]
        name = "r"
        match = { type = "t" }
        request = [{ resource_type = "MEMORY", need = 1 }]
    """))
    assert [r.name for r in config.translator.rules] == ["r"]
    assert config.translator.sizer is None and config.capacity == 1 << 20


@pytest.mark.parametrize("text, needle", [
    ("capcity = 3", "capcity: unknown key"),
    ("capacity = true", "capacity: must be an integer, not a boolean"),
    ("capacity = 2.5", "capacity: must be an integer, not a float"),
    ("capacity = 0", "capacity must be an int in 1..2**30"),
    ("min_confidence = 'high'", "min_confidence: must be a number, not a string"),
    ("min_confidence = 2", "confidence must be in [0, 1]"),
    ("tick = inf", "tick: must be a number"),
    ("immediate_processing = 1", "immediate_processing: must be a boolean"),
    ("[headroom]\nMEMROY = 0.1", "headroom.MEMROY: unknown resource type"),
    ("[headroom]\nMEMORY = 1.5", "headroom.MEMORY: must be a fraction"),
    ("headroom = 3", "headroom: must be a table"),
    ("[quotas]\nper_app = {}", "quotas.per_app: unknown key"),
    ("[quotas.per_type]\nCPU = -1", "quotas.per_type.CPU: must be a finite number >= 0"),
    ("[quotas.per_application]\neditor = 5", "quotas.per_application.editor: must be a table"),
    ("[translator]\nrules_file = 'r.toml'\nextra = 1", "translator.extra: unknown key"),
    ("[translator]\nmin_need = {}", "give exactly one of rules_file"),
    ("[translator]\nrules_file = 'missing.toml'", "cannot read the file"),
    ("[translator]\nrule = []", "no rules"),
    ("[translator]\nrules_file = 'r.toml'\nsizer = 'yes'", "translator.sizer: must be a boolean or a table"),
    ("[translator]\nrules_file = 'r.toml'\nsizer = { quantil = 0.5 }", "translator.sizer.quantil: unknown key"),
    ("[translator]\nrules_file = 'r.toml'\nsizer = { quantile = 5 }", "quantile must be in (0, 1]"),
])
def test_bad_input_is_refused_naming_the_key(tmp_path, text, needle):
    errors = errors_of(tmp_path, text, **{"r.toml": RULES})
    assert any(needle in e for e in errors), errors


def test_every_problem_is_reported_at_once(tmp_path):
    errors = errors_of(tmp_path, "capacity = 'x'\nbogus = 1\n[headroom]\nGPU = 7")
    assert len(errors) == 3 and any(e.startswith("bogus") for e in errors)


def test_an_empty_rules_file_is_refused(tmp_path):
    errors = errors_of(tmp_path, "[translator]\nrules_file = 'empty.toml'", **{"empty.toml": ""})
    assert any("no rules" in e for e in errors), errors
    assert check_file(write(tmp_path, "rule = []", "rules.toml")) == ["no rules (an empty rules file is refused)"]
    assert check_file(write(tmp_path, "", "nothing.toml"))[0].startswith("the file is empty")


def test_rule_errors_come_from_the_translator_naming_the_rule(tmp_path):
    errors = errors_of(tmp_path, "[translator]\nrules_file = 'bad.toml'",
                       **{"bad.toml": "[[rule]]\nname = 'x'\nmatch = { type = 't' }\nrequest = [{ resource_type = 'RAM', need = 1 }]"})
    assert len(errors) == 1 and errors[0].startswith("translator.rules_file") and "rule 'x'" in errors[0] \
        and "'RAM'" in errors[0], errors


@pytest.mark.parametrize("text", [
    "a = " + "[" * 50000 + "]" * 50000,                 # the parser itself would recurse
    "a = " + "{b = " * 3000 + "1" + "}" * 3000,
    ".".join(["k"] * 500) + " = 1",                     # parsed fine, refused by depth
])
def test_deep_nesting_is_refused_cleanly(tmp_path, text):
    errors = errors_of(tmp_path, text)
    assert errors == ["nested deeper than 16 levels"]


def test_not_toml_not_utf8_and_too_large_are_refused(tmp_path):
    assert "not valid TOML" in errors_of(tmp_path, "capacity = = 3")[0]
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"name = '\xe9'")
    assert "not UTF-8" in check_file(path)[0]
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    assert "larger than" in check_file(big)[0]
    with pytest.raises(ConfigError):
        config_from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rules file"):
        config_from_dict({"rule": []})


def test_check_config_cli(tmp_path):
    write(tmp_path, RULES, "rules.toml")
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, "capacity = 'many'\nnope = 1", "bad.toml")
    ok = subprocess.run([sys.executable, "-m", "prealloc", "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    rules = subprocess.run([sys.executable, "-m", "prealloc", "check-config", str(tmp_path / "rules.toml")],
                           capture_output=True, text=True)
    assert rules.returncode == 0 and "1 rule" in rules.stdout, rules.stdout + rules.stderr
    failed = subprocess.run([sys.executable, "-m", "prealloc", "check-config", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert "capacity: must be an integer" in failed.stderr and "nope: unknown key" in failed.stderr


def test_the_built_in_predictor_from_the_file_runs_the_loop(tmp_path):
    from prealloc.predict import MarkovPredictor

    config = load_config(write(tmp_path, """
        [predictor]
        kind = "markov"
        min_confidence = 0.4
        max_predictions = 1
        duration = 60
    """))
    model = config.predictor
    assert isinstance(model, MarkovPredictor) and model.min_confidence == 0.4 and model.max_predictions == 1
    assert [r.name for r in config.translator.rules][:1] == ["markov-MEMORY"]
    for _ in range(4):
        model.observe("a", ResourceType.CUSTOM, 1)
        model.observe("b", ResourceType.CUSTOM, 2)
    model.horizon = 0.0  # what was predicted before an allocator listened lapses
    gate = GatedStrategy(100)
    with ResourcePreallocator(config, allocation_strategies={ResourceType.CUSTOM: gate}) as pre:
        model.observe("a", ResourceType.CUSTOM, 1)  # b's need of 2 is predicted and queued
        [queued] = pre.allocations()
        assert pre.wait_ready([queued.allocation_id], 10) and gate.held == 2


@pytest.mark.parametrize("text, needle", [
    ("[predictor]\nkind = 'oracle'", 'predictor.kind: must be "markov"'),
    ("[predictor]\nkind = 'markov'\nmin_confidnce = 0.5", "predictor.min_confidnce: unknown key"),
    ("[predictor]\nkind = 'markov'\nmax_states = 1.5", "predictor.max_states: must be an integer"),
    ("[predictor]\nkind = 'markov'\ndecay = 0", "decay must be a number in (0, 1]"),
    ("[predictor]\nkind = 'markov'\nduration = -1", "predictor.duration: must be a number of seconds > 0"),
    ("predictor = 3", "predictor: must be a table"),
])
def test_bad_predictor_tables_are_refused_naming_the_key(tmp_path, text, needle):
    errors = errors_of(tmp_path, text)
    assert any(needle in e for e in errors), errors
