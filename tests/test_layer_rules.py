"""The layer rule registry (tas_keras/layer_rules.py) is the only place the library switches on a layer class
(docs/design.md section 12): every other module asks a layer's rule, never its class or its rule's kind."""

import ast

from .conftest import REPO

LIBRARY = REPO / "tas_keras"
REGISTRY = LIBRARY / "layer_rules.py"
# The builders of named networks construct their own layers and load weights into them by class.
BUILDERS = LIBRARY / "models"


def _dotted(node):
    """"keras.layers.Add" for the expression keras.layers.Add; "" for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_string_literal(node):
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_string_literal(element) for element in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def layer_class_switches(source):
    """The lines of `source` that switch on a layer class: an isinstance / issubclass or a `type(x) is` /
    `in` / `==` that names a Keras layer class (keras.layers.X, an alias of keras.layers, a class imported
    from keras, a class tuple imported from the registry), a tuple of such classes, or a comparison of a
    `.kind` or a class name (`__name__`, `class_name`) with a string."""
    tree = ast.parse(source)
    layer_modules, classes = {"keras.layers"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _dotted(node.value) in layer_modules:
            layer_modules.update(_dotted(target) for target in node.targets)
        elif isinstance(node, ast.Import):
            layer_modules.update(alias.asname for alias in node.names if alias.name == "keras.layers" and alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = alias.asname or alias.name
                if node.module == "keras" and alias.name == "layers":
                    layer_modules.add(name)
                elif node.module.split(".")[0] == "keras" and alias.name[:1].isupper():
                    classes.add(name)
                elif node.module == "tas_keras.layer_rules" and alias.name.isupper():
                    classes.add(name)

    def is_class(node):
        node = node.value if isinstance(node, ast.Starred) else node
        return (isinstance(node, ast.Name) and node.id in classes) or (
            isinstance(node, ast.Attribute) and _dotted(node.value) in layer_modules)

    def names_class(node):
        return any(is_class(inner) for inner in ast.walk(node))

    def is_type_call(node):
        return isinstance(node, ast.Call) and _dotted(node.func) == "type"

    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dotted(node.func) in ("isinstance", "issubclass") and len(node.args) == 2:
            switch = names_class(node.args[1])
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            switch = any(is_class(element) for element in node.elts)
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            switch = (any(is_type_call(o) for o in operands) and any(names_class(o) for o in operands)) or (
                any(isinstance(o, ast.Attribute) and o.attr in ("kind", "__name__", "class_name") for o in operands)
                and any(_is_string_literal(o) for o in operands))
        else:
            switch = False
        if switch:
            lines.add(node.lineno)
    return lines


SWITCHES = '''
import keras
from keras import layers as KL
from keras.layers import Add
from keras.src.applications.convnext import LayerScale
from tas_keras.layer_rules import PASS_CLASSES, rule_for
_L = keras.layers


def switching(layer, graph_layer, model, kind):
    a = isinstance(layer, keras.layers.Add)  # switch
    b = isinstance(layer, (_L.Add, KL.Concatenate))  # switch
    c = type(layer) is Add  # switch
    d = type(layer) in (LayerScale,)  # switch
    e = isinstance(layer, PASS_CLASSES)  # switch
    no_ops = (_L.Dropout, _L.Identity)  # switch
    f = graph_layer.kind == "merge"  # switch
    g = graph_layer.kind in ("input", "conv")  # switch
    h = "batch_norm" != rule_for(graph_layer).kind  # switch
    i = type(layer).__name__ == "Add"  # switch
    j = graph_layer.class_name in ("Conv2D", "Dense")  # switch
    # Not switches: building layers, asking the rule, other classes and kinds.
    x = keras.layers.Dense(3)(model.inputs[0])
    built = [_L.Conv2D(4, 1), KL.ReLU()]
    k = rule_for(graph_layer).batch_normalizes and rule_for(graph_layer).adds_inputs(layer)
    m = isinstance(model, keras.Model) and isinstance(layer, (int, float))
    n = kind == SLOT and type(layer).__name__ and type(layer) is type(model)
'''


def test_the_check_finds_every_kind_of_switch_and_nothing_else():
    expected = {number for number, line in enumerate(SWITCHES.splitlines(), start=1) if line.endswith("# switch")}
    assert len(expected) == 11
    assert layer_class_switches(SWITCHES) == expected


def test_no_module_but_the_registry_switches_on_a_layer_class():
    modules = [path for path in sorted(LIBRARY.rglob("*.py")) if path != REGISTRY and BUILDERS not in path.parents]
    assert {LIBRARY / "graph.py", LIBRARY / "importance.py", LIBRARY / "supernet.py"} <= set(modules)
    switches = {str(path.relative_to(REPO)): sorted(layer_class_switches(path.read_text())) for path in modules}
    assert {path: lines for path, lines in switches.items() if lines} == {}
