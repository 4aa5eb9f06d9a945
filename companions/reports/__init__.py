"""What explains a run or an answer in figures; none imports the script.

grids.py          the 4x4 grids of images, on matplotlib Figures
report.py         the figures that explain a run, report.html (report_page.html) and metrics.json;
                  imported when a run writes its outputs
inside.py         every layer's values for one image, why it answered, and the figures of maps and filters
"""
