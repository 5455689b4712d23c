"""One vocabulary across methods: the same argument names everywhere, and the old names told the fix."""
import inspect

import pytest

import diffseg_utils as ds
from diffseg_utils.attention_maps import CrossAttentionMaps
from diffseg_utils.grounding.diagnostics import cross_attention_tokens
from diffseg_utils.grounding.features import generate_with_features
from diffseg_utils.grounding.ground import ground_explorer
from diffseg_utils.grounding.module import GroundingModule
from diffseg_utils.grounding.protocols import evaluate_on_generations
from diffseg_utils.grounding.shards import synthesize
from diffseg_utils.sampling import generate

SAMPLERS = [generate, generate_with_features, ds.daam_segment, ds.ground, ground_explorer, synthesize,
            evaluate_on_generations, cross_attention_tokens]
# words other libraries (or earlier versions of this one) use for the same thing
SYNONYMS = {"guidance", "cfg_scale", "num_inference_steps", "n_steps", "steps", "nsteps", "random_seed",
            "generator_seed", "show_progress", "verbose", "pbar"}


def _public_callables():
    for name in ds.__all__:
        obj = getattr(ds, name)
        if inspect.isclass(obj):
            yield from ((f"{name}.{m}", f) for m, f in inspect.getmembers(obj, inspect.isfunction)
                        if not m.startswith("_") or m == "__init__")
        elif callable(obj):
            yield name, obj


@pytest.mark.parametrize("name,fn", list(_public_callables()) + [(f.__name__, f) for f in SAMPLERS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_no_synonyms_for_the_shared_argument_names(name, fn):
    params = set(inspect.signature(fn).parameters)
    assert not params & SYNONYMS, f"{name} uses {sorted(params & SYNONYMS)}: use num_steps / guidance_scale / seed / progress"


@pytest.mark.parametrize("fn", SAMPLERS, ids=lambda f: f.__name__)
def test_samplers_share_num_steps_guidance_scale_and_seed(fn):
    params = inspect.signature(fn).parameters
    assert {"num_steps", "guidance_scale", "seed"} <= set(params), f"{fn.__name__}: {list(params)}"


def test_emerdiff_uses_num_steps_and_seed():
    assert {"num_steps", "seed", "progress"} <= set(inspect.signature(ds.emerdiff_segment).parameters)


def test_the_cfg_batch_flag_is_a_bool_not_a_scale(sd_tiny):
    with pytest.raises(TypeError, match="cfg_batch must be True or False"):
        CrossAttentionMaps(sd_tiny, cfg_batch=7.5)
    assert set(inspect.signature(GroundingModule.for_backbone).parameters) >= {"cfg_batch"}
