"""Whole collections of photos: gathering them from folders, zips and lists (collection), predicting them all,
resumably (analyze), fast inference engines (engines), and the counts with intervals and the HTML report (report)."""
