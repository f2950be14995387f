import pytest

from slimkit.errors import RecipeError
from slimkit.recipes import builtin_recipes, get_recipe, load_recipe_file, parse_recipe


@pytest.mark.parametrize(
    "steps,where",
    [
        ([{"method": "magnitude_prune", "sparsity": 1.5}], "steps[0].sparsity"),
        ([{"method": "rtn_quantize", "bits": 4}, {"method": "rtn_quantize", "bits": 12}], "steps[1].bits"),
        ([{"method": "rtn_quantize", "bitz": 4}], "steps[0].bitz"),
        ([{"method": "magnitude_prune", "pattern": "4:2"}], "steps[0].pattern"),
        ([{"method": "magnitude_prune", "pattern": "two:four"}], "steps[0].pattern"),
        ([{"method": "magnitude_prune"}], "exactly one of"),
        ([{"method": "squeeze_harder"}], "steps[0].method: unknown method 'squeeze_harder'"),
        ([{"sparsity": 0.5}], "steps[0].method"),
        ([], "steps"),
    ],
)
def test_bad_recipes_point_at_the_field(steps, where):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "r", "steps": steps})
    assert where in str(err.value)


def test_bad_top_level_field():
    with pytest.raises(RecipeError, match="nmae"):
        parse_recipe({"nmae": "x", "steps": [{"method": "rtn_quantize"}]})


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - method: rtn_quantize\n    group_size: -1\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*\n.*steps\[0\]\.group_size"):
        load_recipe_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe_file(broken)


def test_builtins_parse_and_round_trip(tmp_path):
    assert {"magnitude-2of4", "rtn-int4-g64", "rtn-int8", "magnitude-50"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = get_recipe(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        assert load_recipe_file(path) == recipe


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="slimkit recipes"):
        get_recipe("no-such-recipe")
