"""The CIFAR ResNets' shapes at the edge: an ArchConfig (the CIFAR builder's description, and the form of
the paper's released xchannels/xblocks shapes, `ArchConfig.from_released` / `to_released`) is a GraphShape
of the CIFAR ResNet's independent-mode space (the reference's), whose slots and stages keep the conv names
and the stage order of ArchConfig. Shape files in those forms are read as that GraphShape
(`tas_keras.shapes.load_shape`); a GraphShape is written in them through `arch_from_shape`.
"""

from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig, conv_slots, parse_model_name
from tas_keras.supernet import search_space


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
    shape = space.shape({s.name: widths[s.name] for s in space.searchable_slots}, depths, arch.provenance)
    space.validate(shape)
    return shape


def imported_shape(arch):
    """The GraphShape of `arch` in the reference's space of its registry network (`search_space`)."""
    return shape_from_arch(search_space(arch.name, build_model(arch.name, arch.input_shape, arch.num_classes)), arch)


def arch_from_shape(space, shape):
    """The ArchConfig of a GraphShape of a CIFAR ResNet's space."""
    space.validate(shape)
    depth, block = parse_model_name(space.name)
    stage_blocks = []
    for stage_index in range(1, 4):
        stage = _cifar_stage(space, stage_index)
        stage_blocks.append(shape.depths[stage.name] if stage else 1)
    return ArchConfig(depth=depth, block=block, num_classes=space.num_classes,
                      widths=[space.width(shape, slot.name) for slot in conv_slots(depth, block)],
                      stage_blocks=stage_blocks, input_shape=space.input_shape, provenance=shape.provenance)


def _cifar_stage(space, stage_index):
    first = f"s{stage_index}_b1"
    return next((stage for stage in space.stages if stage.first_block == first), None)
