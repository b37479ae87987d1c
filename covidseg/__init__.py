"""covidseg: reproducible COVID-19 lung-lesion segmentation on chest CT (MosMedData).

Importing the package has no side effects: nothing is downloaded, seeded, styled or generated.
"""

__version__ = "0.1.0"
