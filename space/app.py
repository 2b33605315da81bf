"""The ideoquant Space: `ideoquant app` as a Hugging Face Space runs it (Gradio SDK, `python app.py`).

The page, its jobs and its limits are ideoquant's own (`ideoquant.webapp`); this file only sets the Space's limits:
a free CPU Space has 2 vCPU, 16 GB of RAM and 50 GB of disk, of which a job may take 45 GB.
"""

from ideoquant.webapp.page import launch

if __name__ == "__main__":
    launch(host="0.0.0.0", port=7860, disk_budget=45 * 10**9, time_limit=4 * 3600)
