"""A second knob declaration, shaped like DeepEP V2's ElasticBuffer: one num_sms per op (combine may differ from
dispatch), no chunk or buffer knob, and a boolean buffer setting both ops share. It proves that search, records,
resume and the results file work from a declaration alone: nothing under deepep_tune/tune/ knows it."""

from deepep_tune.knobs import Baseline, Knobs, KnobSpace

KNOBS = ("num_sms", "overlap")
SMS = (4, 8, 12, 16, 20, 24, 28, 32)
# "the library's own choice" at each overlap setting, as a bandwidth model would give it
MODEL_CHOICE = {True: 8, False: 24}


def grid(sms_cap):
    values = {"num_sms": tuple(s for s in SMS if s <= sms_cap), "overlap": (False, True)}
    return {"dispatch": values, "combine": values}


def error(op, cfg):
    if cfg.num_sms <= 0 or cfg.num_sms % 2:
        return f"num_sms {cfg.num_sms} must be positive and even"
    return None


def baselines(ep_size, answer_sms, facts):
    choice = {**MODEL_CHOICE, **{k == "True": v for k, v in (facts.get("model_choice") or {}).items()}}
    return [Baseline(f"model_overlap_{ov}", f"the model's own num_sms with overlap={ov}",
                     Knobs.of(KNOBS, (choice[ov], ov)), Knobs.of(KNOBS, (choice[ov], ov))) for ov in (True, False)]


V2_SHAPED = KnobSpace(library="tests.data.v2_shaped:V2_SHAPED", knobs={"dispatch": KNOBS, "combine": KNOBS},
                      shared=("overlap",), grid=grid, error=error, baselines=baselines)


def time_us(op, num_sms, overlap):
    """A landscape with a known optimum: dispatch is best at 16 SMs, combine at 24, both without overlap; time
    falls with SMs, then rises a little (contention), and overlap costs 10 %."""
    best = 16 if op == "dispatch" else 24
    base = 100.0 + 2.0 * (num_sms - best) ** 2 / 4 + (0.0 if op == "dispatch" else 30.0)
    return base * (1.1 if overlap else 1.0)
