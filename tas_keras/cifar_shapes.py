"""The CIFAR ResNets' shapes at the edge: an ArchConfig (the released xchannels/xblocks shapes, the CIFAR
builder's description) is a GraphShape of the CIFAR ResNet's independent-mode space, whose slots and
stages keep the conv names and the stage order of ArchConfig.
"""

from tas_keras.graph_space import GraphShape
from tas_keras.search_space import ArchConfig, conv_slots, parse_model_name


def shape_from_arch(space, arch):
    """The GraphShape of `arch` in the space read from the full CifarResNet of the same model."""
    widths = {slot.name: width for slot, width in zip(arch.slots, arch.widths)}
    unknown = {s.name for s in space.searchable_slots} - set(widths)
    if unknown:
        raise ValueError(f"{arch.name} has no width for the slots {sorted(unknown)} of space {space.name!r}")
    depths = {}
    for stage_index, kept in enumerate(arch.stage_blocks, start=1):
        stage = _cifar_stage(space, stage_index)
        if stage is None:
            if kept != 1:
                raise ValueError(f"{space.name!r} has no droppable blocks in stage {stage_index}")
            continue
        depths[stage.name] = kept
    shape = GraphShape({s.name: widths[s.name] for s in space.searchable_slots}, depths)
    space.validate(shape)
    return shape


def arch_from_shape(space, shape):
    """The ArchConfig of a GraphShape of a CIFAR ResNet's space."""
    space.validate(shape)
    depth, block = parse_model_name(space.name)
    stage_blocks = []
    for stage_index in range(1, 4):
        stage = _cifar_stage(space, stage_index)
        stage_blocks.append(shape.depths[stage.name] if stage else 1)
    classes = space.slot(space.layer(space.output).out_slot).full_width
    return ArchConfig(depth=depth, block=block, num_classes=classes,
                      widths=[space.width(shape, slot.name) for slot in conv_slots(depth, block)],
                      stage_blocks=stage_blocks, input_shape=space.input_shape,
                      provenance={"source": "graph shape"})


def _cifar_stage(space, stage_index):
    first = f"s{stage_index}_b1"
    return next((stage for stage in space.stages if stage.first_block == first), None)
