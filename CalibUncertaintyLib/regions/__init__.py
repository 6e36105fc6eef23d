"""Error regions: ranked parts of the connected components of a thresholded uncertainty map, each
fitting one view (METHODS.md §5)."""

from .components import (DEFAULT_MAX_EXTENT_MM, Region, class_name_of, component_volumes, find_regions,
                         find_regions_and_labels, regions_to_dict)

__all__ = ["DEFAULT_MAX_EXTENT_MM", "Region", "find_regions", "regions_to_dict", "class_name_of",
           "component_volumes", "find_regions_and_labels"]
