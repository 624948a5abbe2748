import pytest

from flowtrain.config import RunConfig, load_config, parse_overrides, shipped_config_names
from flowtrain.errors import ConfigError


def test_shipped_configs_load():
    assert {"default", "shakespeare-char", "gpt2-124m"} <= set(shipped_config_names())
    assert load_config("default").data.sources == ["python-stdlib", "python-docs"]
    big = load_config("gpt2-124m")
    assert (big.model.n_layer, big.model.n_embd, big.train.dtype) == (12, 768, "bfloat16")


def test_shakespeare_char_matches_nanogpt_cpu_recipe():
    cfg = load_config("shakespeare-char", ["data.sources=[x.txt]"])
    m, t, o, s = cfg.model, cfg.train, cfg.optim, cfg.schedule
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (4, 4, 128, 64)
    assert (t.batch_size, t.max_steps, o.lr, s.warmup_steps, s.min_lr, s.kind) == (12, 2000, 1e-3, 100, 1e-4, "cosine")
    assert m.embd_dropout == m.attn_dropout == m.resid_dropout == 0.0


def test_overrides_are_typed():
    cfg = load_config("default", ["optim.lr=3e-4", "model.n_layer=6", "train.compile=true", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.model.n_layer == 6 and cfg.train.compile is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layr=3", "did you mean 'model.n_layer'"),
        ("optim.learning_rate=1", "did you mean"),
        ("nonsense.key=1", "the sections are"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("model.n_embd=130", "not divisible by n_head"),
        ("optim.lr=.inf", "'optim.lr' (got inf): Input should be a finite number"),
        ("optim.lr=.nan", "'optim.lr' (got nan)"),
        ("optim.betas=[0.9,.nan]", "'optim.betas.1' (got nan): Input should be a finite number"),
        ("clip.max_norm=inf", "'clip.max_norm' (got 'inf')"),
        ("schedule.min_lr=-.inf", "schedule.min_lr"),
        ("train.batch_size=big", "train.batch_size"),
        ("optim.name=lion", "optim.name"),
        ("model.norm_placement=middle", "model.norm_placement"),
        (
            "flow.interval=0",
            "'flow.interval' (got 0): Input should be greater than or equal to 1 or Input should be 'auto'",
        ),
        ("flow.interval=sometimes", "'flow.interval' (got 'sometimes')"),
        ("train.run_name=../../x", "not a plain directory name"),
        ("train.run_name=a/b", "train.run_name"),
        ("train.run_name=..", "choose a name like my-run"),
    ],
)
def test_bad_config_fails_with_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("default", ["=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_yaml_roundtrip(tmp_path):
    cfg = load_config("default", ["model.n_layer=3"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    assert RunConfig() != cfg


def test_text_fields_keep_yaml_lookalikes_as_text():
    cfg = load_config("default", ["train.run_name=off", "data.dataset=1e3", "train.out_dir=yes"])
    assert (cfg.train.run_name, cfg.data.dataset, cfg.train.out_dir) == ("off", "1e3", "yes")
    assert load_config("default", ["train.run_name=null"]).train.run_name is None


def test_off_is_a_word_where_a_field_chooses_among_words(tmp_path):
    """`clip.kind=off` on the command line and an unquoted `kind: off` in a YAML file (which YAML reads as
    false) both mean the choice "off"; a real boolean for such a field is still an error."""
    cfg = load_config("default", ["clip.kind=off", "guard.loss_spike=off"])
    assert (cfg.clip.kind, cfg.guard.loss_spike) == ("off", "off")
    path = tmp_path / "run.yaml"
    path.write_text("clip:\n  kind: off\nguard:\n  grad_spike: off\n")
    cfg = load_config(str(path))
    assert (cfg.clip.kind, cfg.guard.grad_spike) == ("off", "off")
    path.write_text("clip:\n  kind: yes\n")  # YAML's true: "on" is not one of clip.kind's choices
    with pytest.raises(ConfigError, match="clip.kind"):
        load_config(str(path))


def test_a_single_source_needs_no_brackets():
    cfg = load_config("shakespeare-char", ["data.sources=path/to/input.txt"])
    assert cfg.data.sources == ["path/to/input.txt"]
    assert load_config("shakespeare-char", ["data.sources=[a.txt,b.txt]"]).data.sources == ["a.txt", "b.txt"]


def test_a_bad_value_in_a_file_names_the_file_and_a_bad_override_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  n_layer: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["optim.lr=3e-4"])
    assert str(info.value).startswith(f"config {path}: invalid config value for 'model.n_layer'")
    path.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["optim.lr=.inf"])
    assert str(info.value).startswith("invalid config value for 'optim.lr'")  # the file is fine: not named


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "is incomplete (no "),  # cut at a line end: valid YAML, sections gone
        (lambda text: text[: text.index("n_head") + 3], "is not valid YAML"),  # cut mid-key
        (lambda text: text.replace("model:", "model: [", 1), "is not valid YAML"),
        (lambda text: "\xff\xfe" + text, "is not UTF-8 text"),
        (lambda text: text.replace("n_layer: 4", "n_layer: four"), "invalid config value for 'model.n_layer'"),
        (lambda text: "- just\n- a list\n", "must be a mapping of sections"),
    ],
)
def test_a_damaged_run_config_is_named_with_where_to_restore_it_from(tmp_path, damage, message):
    from flowtrain.config import load_run_config

    good = load_config("default").to_yaml()
    path = tmp_path / "config.yaml"
    text = damage(good)
    if text.startswith("\xff"):
        path.write_bytes(b"\xff\xfe" + good.encode())
    else:
        path.write_text(text[: text.rindex("\n") + 1] if "incomplete" in message else text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, restore_from=tmp_path / "checkpoints/step_000010/config.yaml")
    line = str(info.value)
    assert str(path) in line and message in line and "\n" not in line
    assert line.endswith("restore it from " + str(tmp_path / "checkpoints/step_000010/config.yaml"))
    path.write_text(good)
    assert load_run_config(path, ["optim.lr=3e-4"]).optim.lr == 3e-4
