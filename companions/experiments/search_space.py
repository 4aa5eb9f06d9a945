"""search's space: one dimension per --space spec, each a range or choices of a setting that compare
can vary, checked as its flag checks it before anything trains.

    lr=log:1e-4..3e-2    dropout=0..0.5    epochs=1..5    batch_size=32,64,128    adam_betas=0.9,0.999|0.7,0.9
"""

import argparse
from dataclasses import dataclass

import mnist_recognition as trainer
from companions.experiments import compare
from companions.training.command_line import takes
from companions.training.errors import CliError

GRID_POINTS = 3  # a range's points in a grid: its ends and its middle (geometric on a log scale)


# ----------------------------------------------------------------------------------------------
# The space: one dimension per --space spec
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One setting's values: a range (low..high, of floats or whole numbers, log or linear), or
    choices (texts as the flag takes them)."""

    name: str
    low: float = None
    high: float = None
    log: bool = False
    choices: tuple = ()

    @property
    def whole(self):
        return isinstance(self.low, int)

    def suggest(self, trial):
        """The trial's value, as the flag's text."""
        if self.choices:
            return trial.suggest_categorical(self.name, self.choices)
        if self.whole:
            return self.text(trial.suggest_int(self.name, self.low, self.high, log=self.log))
        return self.text(trial.suggest_float(self.name, self.low, self.high, log=self.log))

    def text(self, value):
        """A value as the flag takes it; a range's floats to 4 significant digits, so that the
        trial's command line trains exactly what the trial did."""
        return value if isinstance(value, str) else str(value) if self.whole else f"{value:.4g}"

    def grid(self):
        """The values a grid tries."""
        if self.choices:
            return list(self.choices)
        if self.log:
            points = [self.low * (self.high / self.low) ** (k / (GRID_POINTS - 1)) for k in range(GRID_POINTS)]
        else:
            points = [self.low + (self.high - self.low) * k / (GRID_POINTS - 1) for k in range(GRID_POINTS)]
        return sorted({round(point) for point in points}) if self.whole else points


def parse_dimension(spec):
    """'lr=log:1e-4..3e-2', 'dropout=0..0.5', 'epochs=1..5', 'batch_size=32,64,128', 'pool=avg,max',
    'adam_betas=0.9,0.999|0.7,0.9' (choices of a value that holds commas are parted by |)."""
    name, equals, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    settings = {setting.name: setting for setting in trainer.SETTINGS if takes("search", setting)}
    if not equals or not values.strip():
        raise CliError(f"--space {spec}: write a setting and its values, as in lr=log:1e-4..3e-2 or pool=avg,max.")
    if name not in settings:
        raise CliError(f"--space {spec}: {name} is not a setting search can vary; see 'search --help'.")
    setting, values = settings[name], values.strip()
    if ".." in values:
        return parse_range(spec, setting, values)
    parts = values.split("|") if "|" in values or name in COMMA_VALUES else values.split(",")
    choices = tuple(dict.fromkeys(checked_value(spec, setting, part.strip()) for part in parts))
    return Dimension(name, choices=choices)


COMMA_VALUES = ("widths", "adam_betas", "augment")  # settings whose one value may hold commas


def parse_range(spec, setting, values):
    log = values.startswith("log:")
    low_text, _, high_text = values.removeprefix("log:").partition("..")
    if setting.type is None or setting.choices or setting.name in COMMA_VALUES:
        raise CliError(f"--space {spec}: {setting.name} takes no range; give its choices, as in {setting.name}=a,b.")
    low, high = (setting.type(checked_value(spec, setting, text.strip())) for text in (low_text, high_text))
    if not low < high:
        raise CliError(f"--space {spec}: a range goes from the lower value to the higher, as in 1e-4..3e-2.")
    if log and low <= 0:
        raise CliError(f"--space {spec}: a log range needs values above 0.")
    return Dimension(setting.name, low, high, log)


def checked_value(spec, setting, text):
    """`text`, once the setting is checked to take it (in the spelling its flag takes)."""
    if setting.type is None and setting.choices is None:  # an on/off flag
        if text.lower() not in ("true", "false"):
            raise CliError(f"--space {spec}: {setting.name} is on or off: give true, false or true,false.")
        return text.lower()
    if setting.choices and text not in setting.choices:
        raise CliError(
            f"--space {spec}: {setting.name} is one of {', '.join(setting.choices)}, not {text or 'nothing'}."
        )
    if setting.type is not None:
        try:
            setting.type(text)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise CliError(f"--space {spec}: {setting.name} {text or 'nothing'}: {error}.") from None
    return text


def spec_of(values):
    """The trial's settings as one compare --vary spec: 'lr=0.003,batch_size=128'."""
    return ",".join(f"{name}={text}" for name, text in values.items())


def check_space(specs, base, space):
    """Every setting's ends tried on a training command line before anything trains."""
    names = [dimension.name for dimension in space]
    if len(set(names)) < len(names):
        raise CliError("--space: a setting is given twice; give each once.")
    for spec, dimension in zip(specs, space):
        for value in dimension.grid():
            flags = compare.parse_spec(f"{dimension.name}={dimension.text(value)}").flags
            try:
                trainer.check_optimizer_settings(trainer.parse_args([*base, *flags]))
            except CliError as error:
                raise CliError(f"--space {spec}: {dimension.name} {dimension.text(value)}: {error}") from None
