"""Whole collections of photos: gathering them from folders, zips and lists (collection), predicting them all,
resumably (analyze), fast inference engines (engines), the counts with intervals (summary), shares over time
(trends), the HTML report (report), summaries of rows made anywhere (summarize), and batch engines (batch)."""
