"""The closed sets of values a parameter can take, in one place: config validates params.yaml against
them and the modules that implement each choice import them from here. A leaf module (no imports), so
a stage that only validates its params does not depend on the code behind every choice."""

BACKBONES = ("vgg16", "vgg19", "resnet50", "inception_v3", "xception", "mobilenet", "mobilenet_v2",
             "efficientnet_b0")  # features.backbones.ARCHS implements each (a test checks they match)
POOLINGS = ("flatten", "avg", "max")  # backbone.pooling
PRECISIONS = ("float32", "bfloat16")  # compute.precision
FILL_MODES = ("nearest", "reflect", "wrap", "constant")  # augment.fill_mode
AUGMENT_MODES = ("cached", "online")  # augment.mode: views stored by the viewcache stage, or drawn in training
MODEL_NAMES = ("head", "head_aug", "finetuned")  # models/<name>.keras, in the order the stages write them
FINETUNE_FROM = ("head_aug", "head")  # finetune.from: the model fine-tuning starts from
TRAIN_KEEPS = ("best", "last")  # train.keep: the weights a training stage saves (best validation epoch, or last)
