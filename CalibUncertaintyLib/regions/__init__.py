"""Error regions: ranked connected components of a thresholded uncertainty map (METHODS.md §5)."""

from .components import Region, class_name_of, find_regions, regions_to_dict

__all__ = ["Region", "find_regions", "regions_to_dict", "class_name_of"]
