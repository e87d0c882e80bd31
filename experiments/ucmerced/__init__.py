"""The UC Merced study: scene-class pretraining on 2,100 aerial scenes from many US
places, scored on the Dubai dev split by transfer and leave-one-tile-out (README.md)."""
