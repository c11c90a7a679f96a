"""Config system: YAML + flags -> typed dataclasses, strict keys, types and combinations (row 31)."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from temper import config


@dataclass
class Inner:
    lr: float = 1e-3
    """Peak learning rate."""
    kind: Literal["cosine", "constant"] = "cosine"
    """Schedule."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass
class Outer:
    name: str = "run"
    """Run name."""
    inputs: list[str] = field(default_factory=list)
    """Input globs."""
    steps: int | None = None
    """Steps."""
    flag: bool = False
    """A switch."""
    inner: Inner = field(default_factory=Inner)
    """A section."""
    extra: dict = field(default_factory=dict)
    """Free-form overrides."""


def test_yaml_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\ninner:\n  lr: 0.5\n  kind: constant\nsteps: 3\n")
    cfg = config.parse(Outer, ["--config", str(f), "--inner.lr=3e-4", "--inputs", "x", "--inputs=y", "--flag",
                               "--extra.dim=128"])
    assert cfg == Outer(name="a", inputs=["x", "y"], steps=3, flag=True, inner=Inner(3e-4, "constant"),
                        extra={"dim": 128})


def test_round_trip_yaml(tmp_path):
    cfg = Outer(name="b", inputs=["q"], inner=Inner(lr=0.25))
    f = tmp_path / "c.yaml"
    f.write_text(config.to_yaml(cfg))
    assert config.parse(Outer, ["--config", str(f)]) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inner.lrr=1"], "unknown config key 'inner.lrr' (did you mean 'inner.lr'?)"),
        (["--stepz=1"], "unknown config key 'stepz' (did you mean 'steps'?)"),
        (["--inner.lr=fast"], "inner.lr: expected a number, got 'fast'"),
        (["--steps=1.5"], "steps"),
        (["--flag=maybe"], "flag: expected true or false"),
        (["--inner.kind=linear"], "inner.kind: 'linear' is not one of 'cosine', 'constant'"),
        (["--inner.lr=-1"], "section 'inner': lr must be > 0"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_input_names_the_key(argv, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(Outer, argv)
    assert message in str(e.value)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.parse(Outer, ["--config", str(tmp_path / "missing.yaml")])
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.parse(Outer, ["--config", str(f)])


def test_help_lists_every_key_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        config.parse(Outer, ["--help"])
    out = capsys.readouterr().out
    assert "--inner.lr=0.001  (float)  Peak learning rate." in out
    assert "--inputs=[]" in out and "Input globs." in out


def test_text_flags_are_taken_verbatim():
    cfg = config.parse(Outer, ["--name=yes", "--inputs", "null", "--inputs=[INST] hi", "--steps=null"])
    assert cfg.name == "yes" and cfg.inputs == ["null", "[INST] hi"] and cfg.steps is None
    assert config.parse(Outer, ["--inputs=[]"]).inputs == []
    assert config.parse(Outer, ["--inputs=[a, b]"]).inputs == ["a", "b"]
    with pytest.raises(config.ConfigError, match="--steps"):
        config.parse(Outer, ["--steps=\x00"])


def test_every_training_recipe_exposes_the_same_sections():
    """run / train / eval / checkpoint / log mean the same in every training recipe: each is (a subclass
    of) the scaffold's section, so `--train.compile`, `--checkpoint.keep_last_n`, `--eval.every=0`, ...
    behave alike everywhere."""
    import typing

    from temper.recipes import pretrain, sft
    from temper.train import run

    base = {"run": run.RunSection, "train": run.TrainSection, "eval": run.EvalSection,
            "checkpoint": run.CheckpointSection, "log": run.LogSection}
    assert set(base) == set(run.SECTIONS)
    for recipe in (pretrain.PretrainConfig, sft.SFTConfig):
        hints = typing.get_type_hints(recipe)
        for name, section in base.items():
            assert issubclass(hints[name], section), (recipe.__name__, name)
        defaults = recipe()
        assert defaults.checkpoint.keep_last_n == 3 and defaults.train.on_nonfinite == "fail"


def test_a_sections_own_defaults_survive_an_override_of_one_key():
    """sft's optimizer defaults (lr 2e-4, no weight decay) stay when only --optim.lr is given."""
    from temper.recipes.sft import SFTConfig

    cfg = config.parse(SFTConfig, ["--optim.lr=5e-3", "--run.name=x"])
    assert cfg.optim.lr == 5e-3 and cfg.optim.weight_decay == 0.0 and cfg.run.seed == 0
    assert cfg.schedule.warmup_steps == 10


@dataclass
class Item:
    rule: str = ""
    """What scores."""
    weight: float = 1.0
    """How much it counts."""

    def __post_init__(self):
        if not self.rule:
            raise ValueError("rule: required")


@dataclass
class WithList:
    items: list[Item] = field(default_factory=lambda: [Item("a")])
    """Weighted items."""
    inner: Inner = field(default_factory=Inner)
    """A section."""


def test_a_list_of_sections_from_yaml_and_from_one_flag(tmp_path):
    """A list of sections (a recipe's weighted rewards) is a YAML list of mappings in a file, and one YAML
    flow value on the command line; several flags append; each item is checked as its section."""
    f = tmp_path / "c.yaml"
    f.write_text("items:\n  - rule: x\n    weight: 2\n  - {rule: y}\n")
    assert config.parse(WithList, ["--config", str(f)]).items == [Item("x", 2.0), Item("y", 1.0)]
    assert config.parse(WithList, ["--items=[{rule: x, weight: 2}, {rule: y}]"]).items == [Item("x", 2.0), Item("y")]
    assert config.parse(WithList, ["--items", "[{rule: x}]", "--items={rule: y}"]).items == [Item("x"), Item("y")]
    assert config.parse(WithList, []).items == [Item("a")]
    cfg = WithList(items=[Item("p", 0.5)])
    f.write_text(config.to_yaml(cfg))
    assert config.parse(WithList, ["--config", str(f)]) == cfg


@pytest.mark.parametrize("argv, message", [
    (["--items=[{rulee: x}]"], "unknown config key 'items[0].rulee' (did you mean 'items[0].rule'?)"),
    (["--items=[{rule: x}, {weight: 2}]"], "section 'items[1]': rule: required"),
    (["--items=[{rule: x, weight: heavy}]"], "items[0].weight: expected a number, got 'heavy'"),
    (["--items=[x]"], "items[0]: expected a section (mapping), got 'x'"),
    (["--items=[{rule: x}"], "--items: cannot read value"),
    # A key inside a list would replace the whole list with a one-item list of mostly defaults.
    (["--items.weight=2"], "--items.weight: items is a list, given whole: --items='[...]'"),
])
def test_bad_list_of_sections_names_the_item_and_key(argv, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(WithList, argv)
    assert message in str(e.value)


def test_help_shows_a_list_of_sections_as_yaml_with_its_item_keys(capsys):
    with pytest.raises(SystemExit):
        config.parse(WithList, ["--help"])
    out = capsys.readouterr().out
    assert "--items='[{rule: a, weight: 1.0}]'  (list of sections)  Weighted items." in out
    assert "rule: (str)  What scores." in out and "weight: (float)  How much it counts." in out
