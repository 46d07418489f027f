"""Whole-slide reading (OpenSlide at a chosen µm/px), tissue mask, Yottixel mosaic, tile plans.

Torch-free and part of the ground, because data preparation and the slide search of the
service both read slides the same way; imports nothing above `histoseek`.
"""
