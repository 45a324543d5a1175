"""The pack's custom link types. The objects that travel along them (the experts bundle, the LoRA pair) are the
core's (:mod:`trainer_core.bundle`): ComfyUI keeps a node's outputs cached while its inputs are unchanged, so one
bundle is handed to every Train LoRA and Preview Sample node of the graph, across queue runs."""

#: Custom ComfyUI link types of this pack.
EXPERTS = "WAN22_EXPERTS"
DATASET = "WAN22_DATASET"
MULTISTAGE = "WAN22_MULTISTAGE"
SAVE = "WAN22_SAVE"
LORA = "WAN22_LORA"
OPTIMIZER = "WAN22_OPTIMIZER"
REGULARIZERS = "WAN22_REGULARIZERS"
HARDWARE = "WAN22_HARDWARE"
CATEGORY = "Wan22 LoRA Trainer"
#: Tooltip tail of a render's strength: Load Wan22 LoRA Pair folds its own strength into the pair, so they multiply.
TIMES_LOAD_STRENGTH = (". Multiplies with Load Wan22 LoRA Pair's strength (0.5 there and 0.5 here "
                       "apply 0.25)")
