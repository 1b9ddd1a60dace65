using System.Globalization;
using QcowTier.Heat;
using QcowTier.Heat.Analysis;
using QcowTier.Heat.Render;

namespace QcowTier;

/// <summary>Pictures of heat maps, as PNG files: a heat strip along the disk, and the SSD-capacity curve.</summary>
public static class HeatRender
{
    internal const int Scale = 2;
    internal const int Pad = 14;
    internal const int HeatStripHeight = 60;
    internal const int TierStripHeight = 28;

    internal static readonly Rgb Background = Rgb.Hex(0xffffff);
    internal static readonly Rgb Ink = Rgb.Hex(0x202020);
    internal static readonly Rgb Untouched = Rgb.Hex(0xe6e6e6);
    internal static readonly Rgb SsdColor = Rgb.Hex(0x2b7bba);
    internal static readonly Rgb HddColor = Rgb.Hex(0x8c6d46);
    internal static readonly Rgb UnallocatedColor = Rgb.Hex(0xe6e6e6);
    internal static readonly Rgb IoColor = Rgb.Hex(0x1f77b4);
    internal static readonly Rgb ReadColor = Rgb.Hex(0x2ca02c);
    internal static readonly Rgb WriteColor = Rgb.Hex(0xff7f0e);
    internal static readonly Rgb GridColor = Rgb.Hex(0xe8e8e8);
    internal static readonly Rgb DiagonalColor = Rgb.Hex(0x9a9a9a);

    // A perceptually ordered ramp (after matplotlib's "inferno"), starting dark enough to stand apart from
    // the light grey of untouched units.
    private static readonly Rgb[] Ramp = [Rgb.Hex(0x2d0b59), Rgb.Hex(0x7a1d6d), Rgb.Hex(0xc53c4e), Rgb.Hex(0xf2771a), Rgb.Hex(0xfbe44a)];

    /// <summary>
    /// Writes a heat strip: x is the disk offset, colour the hottest unit under each pixel column on a log
    /// scale (grey where nothing was touched); below it, when a placement is given, the tier of each column
    /// (SSD, HDD, unallocated; mixed columns blend in proportion).
    /// </summary>
    /// <param name="output">Receives the PNG.</param>
    /// <param name="map">The heat map.</param>
    /// <param name="placement">The image's placement (<see cref="QcowImage.GetPlacement"/>), or null for no tier strip.</param>
    /// <param name="width">Picture width in pixels (320 to 8192).</param>
    public static void WriteHeatStrip(Stream output, HeatMap map, IReadOnlyList<TierExtent>? placement = null, int width = 1024)
    {
        ArgumentNullException.ThrowIfNull(output);
        PngWriter.Write(output, RenderHeatStrip(map, placement is null ? [] : [("TIER", placement)], width));
    }

    /// <summary>
    /// Writes a rebalance picture: the heat strip over two tier strips, the placement before and after a
    /// rebalance (for a plan, <see cref="RebalancePlan.ProjectPlacement"/> gives the predicted after), so
    /// hot columns turning SSD-blue and cold ones HDD-brown show at a glance what moved.
    /// </summary>
    /// <param name="output">Receives the PNG.</param>
    /// <param name="map">The heat map.</param>
    /// <param name="before">The placement before.</param>
    /// <param name="after">The placement after (or as planned).</param>
    /// <param name="width">Picture width in pixels (320 to 8192).</param>
    public static void WriteRebalancePicture(Stream output, HeatMap map, IReadOnlyList<TierExtent> before, IReadOnlyList<TierExtent> after, int width = 1024)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(before);
        ArgumentNullException.ThrowIfNull(after);
        PngWriter.Write(output, RenderHeatStrip(map, [("BEFORE", before), ("AFTER", after)], width));
    }

    /// <summary>Writes a heat strip with the tier strip of an open image (see the other overload).</summary>
    /// <param name="output">Receives the PNG.</param>
    /// <param name="map">The heat map.</param>
    /// <param name="image">The image whose placement is drawn.</param>
    /// <param name="width">Picture width in pixels (320 to 8192).</param>
    public static void WriteHeatStrip(Stream output, HeatMap map, QcowImage image, int width = 1024)
    {
        ArgumentNullException.ThrowIfNull(image);
        WriteHeatStrip(output, map, image.GetPlacement(), width);
    }

    /// <summary>
    /// Writes the SSD-capacity curve of a report: x is SSD capacity as % of the image, y the % of I/O served
    /// when the hottest units fill it, for all I/O, reads and writes, against the diagonal of a workload
    /// without skew.
    /// </summary>
    /// <param name="output">Receives the PNG.</param>
    /// <param name="report">The analysis (<see cref="HeatAnalysis.Analyze"/>).</param>
    /// <param name="width">Picture width in pixels (320 to 8192).</param>
    /// <param name="height">Picture height in pixels (240 to 8192).</param>
    public static void WriteCapacityCurve(Stream output, HeatSkewReport report, int width = 800, int height = 500)
    {
        ArgumentNullException.ThrowIfNull(output);
        PngWriter.Write(output, RenderCapacityCurve(report, width, height));
    }

    /// <summary>Where the strips lie; the legend below them flows into as many rows as the width needs.</summary>
    internal readonly record struct StripLayout(int X0, int X1, int HeatY, int TierY, int AxisY)
    {
        /// <summary>Top of the k-th tier strip.</summary>
        public int TierStripY(int k) => TierY + k * (TierStripHeight + 6);
    }

    internal static StripLayout LayoutStrip(int width, bool tiers) => LayoutStrip(width, tiers ? 1 : 0, "HEAT");

    internal static StripLayout LayoutStrip(int width, int tierStrips, string widestLabel)
    {
        var th = Canvas.TextHeight(Scale);
        var x0 = Pad + Math.Max(Canvas.TextWidth("HEAT", Scale), Canvas.TextWidth(widestLabel, Scale)) + 12;
        var heatY = Pad + th + 12;
        var tierY = heatY + HeatStripHeight + 6;
        var axisY = tierStrips > 0 ? tierY + tierStrips * (TierStripHeight + 6) - 6 : heatY + HeatStripHeight;
        return new StripLayout(x0, width - Pad, heatY, tierY, axisY);
    }

    /// <summary>A legend entry: its width, and how to draw it at a position.</summary>
    private readonly record struct LegendItem(int Width, Action<Canvas, int, int> Draw, bool NewRow = false);

    private static LegendItem Swatch(Rgb color, string label)
    {
        var th = Canvas.TextHeight(Scale);
        return new LegendItem(th + 6 + Canvas.TextWidth(label, Scale), (c, x, y) =>
        {
            c.Fill(x, y, th, th, color);
            c.Rect(x, y, th, th, Ink);
            c.Text(x + th + 6, y, label, Ink, Scale);
        });
    }

    private static LegendItem Label(string text, int room)
    {
        text = Fit(text, room);
        return new(Canvas.TextWidth(text, Scale), (c, x, y) => c.Text(x, y, text, Ink, Scale));
    }

    /// <summary>Positions of the legend items, left to right, wrapping at <paramref name="right"/>.</summary>
    private static List<(int X, int Y)> Flow(List<LegendItem> items, int left, int right, int top, out int bottom)
    {
        var rowHeight = Canvas.TextHeight(Scale) + 10;
        var at = new List<(int, int)>();
        int x = left, y = top;
        foreach (var item in items)
        {
            if (x > left && (item.NewRow || x + item.Width > right))
            {
                x = left;
                y += rowHeight;
            }
            at.Add((x, y));
            x += item.Width + 20;
        }
        bottom = y + rowHeight;
        return at;
    }

    internal static Canvas RenderHeatStrip(HeatMap map, IReadOnlyList<(string Label, IReadOnlyList<TierExtent> Placement)> tiers, int width)
    {
        ArgumentNullException.ThrowIfNull(map);
        ArgumentOutOfRangeException.ThrowIfLessThan(width, 320);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(width, Canvas.MaxSide);
        var widest = tiers.Select(t => t.Label).DefaultIfEmpty("HEAT").MaxBy(l => Canvas.TextWidth(l, Scale))!;
        var layout = LayoutStrip(width, tiers.Count, widest);
        var sw = layout.X1 - layout.X0;
        var vs = Math.Max(1, map.VirtualSize);
        var th = Canvas.TextHeight(Scale);
        var inv = CultureInfo.InvariantCulture;

        // Hottest score under each column.
        var column = new double[sw];
        Array.Fill(column, -1);
        double max = 0;
        long touched = 0;
        var unitSize = map.UnitSize;
        HeatHistogram.ForEachTouched(map, (unit, r, w) =>
        {
            var score = map.ReadWeight * HeatCounter.Decode((byte)r) + map.WriteWeight * HeatCounter.Decode((byte)w);
            var start = unit * unitSize;
            var end = Math.Min(start + unitSize, vs);
            var c0 = ColumnOf(start, vs, sw);
            var c1 = ColumnOf(end - 1, vs, sw);
            for (var x = c0; x <= c1; x++)
            {
                column[x] = Math.Max(column[x], score);
            }
            max = Math.Max(max, score);
            touched++;
        });

        const int rampWidth = 120;
        var legend = new List<LegendItem>
        {
            new(Canvas.TextWidth("cold", Scale) + 8 + rampWidth + 8 + Canvas.TextWidth("hot", Scale), (c, x, y) =>
            {
                c.Text(x, y, "cold", Ink, Scale);
                x += Canvas.TextWidth("cold", Scale) + 8;
                for (var i = 0; i < rampWidth; i++)
                {
                    c.Fill(x + i, y, 1, th, RampColor(i / (double)(rampWidth - 1)));
                }
                c.Text(x + rampWidth + 8, y, "hot", Ink, Scale);
            }),
            Label(string.Format(inv, "(log scale, max {0:0.##})", max), layout.X1 - Pad),
            Swatch(Untouched, "untouched"),
        };
        if (tiers.Count > 0)
        {
            legend.Add(Swatch(SsdColor, "SSD") with { NewRow = true });
            legend.Add(Swatch(HddColor, "HDD"));
            legend.Add(Swatch(UnallocatedColor, "unallocated"));
        }
        var labelY = layout.AxisY + 8;
        var positions = Flow(legend, Pad, layout.X1, labelY + th + 16, out var legendBottom);
        var c = new Canvas(width, legendBottom + Pad - 10, Background);

        var logMax = Math.Log(1 + max);
        for (var x = 0; x < sw; x++)
        {
            var color = column[x] < 0 || logMax <= 0 ? Untouched : RampColor(Math.Log(1 + column[x]) / logMax);
            c.Fill(layout.X0 + x, layout.HeatY, 1, HeatStripHeight, color);
        }
        c.Rect(layout.X0 - 1, layout.HeatY - 1, sw + 2, HeatStripHeight + 2, Ink);
        c.Text(Pad, layout.HeatY + (HeatStripHeight - th) / 2, "HEAT", Ink, Scale);

        var title = string.Format(inv, "Heat: {0} in {1} units of {2}, {3} touched", FormatBytes(map.VirtualSize), map.UnitCount, FormatBytes(map.UnitSize), touched);
        c.Text(Pad, Pad, Fit(title, width - 2 * Pad), Ink, Scale);

        for (var k = 0; k < tiers.Count; k++)
        {
            var y = layout.TierStripY(k);
            DrawTiers(c, tiers[k].Placement, layout.X0, y, vs, sw);
            c.Rect(layout.X0 - 1, y - 1, sw + 2, TierStripHeight + 2, Ink);
            c.Text(Pad, y + (TierStripHeight - th) / 2, tiers[k].Label, Ink, Scale);
        }

        // Offsets at the quarters of the disk: the ends always, the others where they do not collide.
        var ticks = new (int X, string Label)[5];
        for (var q = 0; q <= 4; q++)
        {
            var x = layout.X0 + (int)Math.Round(q * (sw - 1) / 4.0);
            c.Fill(x, layout.AxisY + 1, 1, 5, Ink);
            ticks[q] = (x, FormatBytes((long)((Int128)map.VirtualSize * q / 4)));
        }
        int LabelX(int q) => Math.Clamp(ticks[q].X - Canvas.TextWidth(ticks[q].Label, Scale) / 2, layout.X0, layout.X1 - Canvas.TextWidth(ticks[q].Label, Scale));
        var drawn = new (int Start, int End)?[5];
        var rightLimit = LabelX(4) - 12;
        foreach (var q in new[] { 0, 2, 1, 3, 4 })
        {
            var lx = LabelX(q);
            var lw = Canvas.TextWidth(ticks[q].Label, Scale);
            if (q is 0 or 4 || (lx + lw <= rightLimit && !Collides(q, lx, lw)))
            {
                c.Text(lx, labelY, ticks[q].Label, Ink, Scale);
                drawn[q] = (lx, lx + lw);
            }
        }
        bool Collides(int q, int lx, int lw)
        {
            for (var o = 0; o < 5; o++)
            {
                if (o != q && drawn[o] is { } d && lx < d.End + 12 && lx + lw + 12 > d.Start)
                {
                    return true;
                }
            }
            return false;
        }

        for (var i = 0; i < legend.Count; i++)
        {
            legend[i].Draw(c, positions[i].X, positions[i].Y);
        }
        return c;
    }

    private static void DrawTiers(Canvas c, IReadOnlyList<TierExtent> placement, int x0, int y, long vs, int sw)
    {
        // Bytes of each kind under each column, so a column half on SSD shows half SSD's colour.
        var ssd = new double[sw];
        var hdd = new double[sw];
        var none = new double[sw];
        foreach (var e in placement)
        {
            var start = Math.Max(0, e.Start);
            var end = Math.Min(vs, e.Start + Math.Max(0, e.Length));
            if (end <= start)
            {
                continue;
            }
            var bucket = e.Tier switch { StorageTier.Ssd => ssd, StorageTier.Hdd => hdd, _ => none };
            var c0 = ColumnOf(start, vs, sw);
            var c1 = ColumnOf(end - 1, vs, sw);
            for (var x = c0; x <= c1; x++)
            {
                var colStart = (long)((Int128)x * vs / sw);
                var colEnd = (long)((Int128)(x + 1) * vs / sw);
                bucket[x] += Math.Max(0, Math.Min(end, colEnd) - Math.Max(start, colStart));
            }
        }
        for (var x = 0; x < sw; x++)
        {
            var total = ssd[x] + hdd[x] + none[x];
            Rgb color;
            if (total <= 0)
            {
                color = UnallocatedColor;
            }
            else
            {
                double r = (ssd[x] * SsdColor.R + hdd[x] * HddColor.R + none[x] * UnallocatedColor.R) / total;
                double g = (ssd[x] * SsdColor.G + hdd[x] * HddColor.G + none[x] * UnallocatedColor.G) / total;
                double b = (ssd[x] * SsdColor.B + hdd[x] * HddColor.B + none[x] * UnallocatedColor.B) / total;
                color = new Rgb((byte)Math.Round(r), (byte)Math.Round(g), (byte)Math.Round(b));
            }
            c.Fill(x0 + x, y, 1, TierStripHeight, color);
        }
    }

    internal static int ColumnOf(long offset, long virtualSize, int columns) =>
        (int)Math.Clamp((long)((Int128)offset * columns / virtualSize), 0, columns - 1);

    internal static Rgb RampColor(double t)
    {
        t = Math.Clamp(t, 0, 1) * (Ramp.Length - 1);
        var i = Math.Min((int)t, Ramp.Length - 2);
        return Rgb.Lerp(Ramp[i], Ramp[i + 1], t - i);
    }

    private static string Fit(string text, int width)
    {
        var max = Math.Max(1, (width / Scale + 1) / (BitmapFont.Width + 1));
        return text.Length <= max ? text : text[..Math.Max(0, max - 3)] + "...";
    }

    internal static string FormatBytes(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double v = bytes;
        var u = 0;
        while (Math.Abs(v) >= 1024 && u < units.Length - 1)
        {
            v /= 1024;
            u++;
        }
        var inv = CultureInfo.InvariantCulture;
        return bytes == 0 ? "0" : u == 0 ? $"{bytes} B" : v == Math.Floor(v) ? string.Format(inv, "{0:0} {1}", v, units[u]) : string.Format(inv, "{0:0.#} {1}", v, units[u]);
    }

    internal readonly record struct PlotArea(int Left, int Top, int Right, int Bottom)
    {
        public int X(double fraction) => Left + (int)Math.Round(fraction * (Right - Left));

        public int Y(double share) => Bottom - (int)Math.Round(share * (Bottom - Top));
    }

    internal static PlotArea LayoutCurve(int width, int height)
    {
        var th = Canvas.TextHeight(Scale);
        var left = Pad + th + 10 + Canvas.TextWidth("100%", Scale) + 10;
        var top = Pad + th + 8 + th + 16;
        var bottom = height - (Pad + th + 12 + th + 10);
        return new PlotArea(left, top, width - Pad - 16, bottom);
    }

    internal static Canvas RenderCapacityCurve(HeatSkewReport report, int width, int height)
    {
        ArgumentNullException.ThrowIfNull(report);
        ArgumentOutOfRangeException.ThrowIfLessThan(width, 320);
        ArgumentOutOfRangeException.ThrowIfLessThan(height, 240);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(width, Canvas.MaxSide);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(height, Canvas.MaxSide);
        var c = new Canvas(width, height, Background);
        var p = LayoutCurve(width, height);
        var th = Canvas.TextHeight(Scale);
        var inv = CultureInfo.InvariantCulture;

        var title = "SSD capacity curve";
        c.Text((width - Canvas.TextWidth(title, Scale)) / 2, Pad, title, Ink, Scale);
        var top20 = report.Top.FirstOrDefault(t => t.ImageFraction == HeatAnalysis.VerdictImageFraction);
        var subtitle = report.Verdict switch
        {
            HeatSkewVerdict.NoActivity => "No activity recorded",
            HeatSkewVerdict.NoSkew => string.Format(inv, "No skew: hottest 20% serves {0:0.0}% of I/O", top20.IoShare * 100),
            _ => string.Format(inv, "Skewed: hottest 20% serves {0:0.0}% of I/O", top20.IoShare * 100),
        };
        subtitle = Fit(subtitle, width - 2 * Pad);
        c.Text((width - Canvas.TextWidth(subtitle, Scale)) / 2, Pad + th + 8, subtitle, Ink, Scale);

        for (var i = 0; i <= 10; i++)
        {
            c.Fill(p.X(i / 10.0), p.Top, 1, p.Bottom - p.Top, GridColor);
            c.Fill(p.Left, p.Y(i / 10.0), p.Right - p.Left, 1, GridColor);
        }
        c.Line(p.Left, p.Bottom, p.Right, p.Top, DiagonalColor, 1, dash: 6);

        var curve = report.CapacityCurve;
        void Series(Func<HeatCapacityPoint, double> share, Rgb color, int thickness)
        {
            for (var i = 1; i < curve.Count; i++)
            {
                c.Line(p.X(curve[i - 1].CapacityFraction), p.Y(share(curve[i - 1])), p.X(curve[i].CapacityFraction), p.Y(share(curve[i])), color, thickness);
            }
        }
        var legend = new List<(Rgb Color, string Label, int Thickness, int Dash)>();
        if (report.UnitReads > 0 && report.UnitWrites > 0)
        {
            Series(pt => pt.ReadShare, ReadColor, 2);
            Series(pt => pt.WriteShare, WriteColor, 2);
            legend.Add((ReadColor, "reads", 2, 0));
            legend.Add((WriteColor, "writes", 2, 0));
        }
        if (report.UnitReads + report.UnitWrites > 0)
        {
            Series(pt => pt.IoShare, IoColor, 3);
            legend.Insert(0, (IoColor, "all I/O", 3, 0));
            var mx = p.X(top20.ImageFraction);
            var my = p.Y(top20.IoShare);
            c.Fill(mx - 4, my - 4, 9, 9, Ink);
            var note = string.Format(inv, "20%: {0:0}% of I/O", top20.IoShare * 100);
            var nx = Math.Min(mx + 10, p.Right - Canvas.TextWidth(note, Scale));
            var ny = my + 10 + th <= p.Bottom ? my + 10 : my - 10 - th;
            c.Text(nx, ny, note, Ink, Scale);
        }
        legend.Add((DiagonalColor, "no skew", 1, 6));

        // Axes over the grid and curves.
        c.Fill(p.Left - 1, p.Top, 2, p.Bottom - p.Top + 1, Ink);
        c.Fill(p.Left - 1, p.Bottom, p.Right - p.Left + 2, 2, Ink);
        // Labels every 20 %, or every 50 % where 20 % of the axis is too short for "100%".
        var room = Canvas.TextWidth("100%", Scale) + 16;
        var xStep = p.X(0.2) - p.X(0) >= room ? 2 : 5;
        var yStep = p.Y(0) - p.Y(0.2) >= th + 8 ? 2 : 5;
        for (var i = 0; i <= 10; i++)
        {
            var label = string.Format(inv, "{0}%", i * 10);
            var lw = Canvas.TextWidth(label, Scale);
            if (i % xStep == 0)
            {
                var x = p.X(i / 10.0);
                c.Fill(x, p.Bottom + 2, 1, 5, Ink);
                c.Text(Math.Min(x - lw / 2, width - Pad - lw), p.Bottom + 10, label, Ink, Scale);
            }
            if (i % yStep == 0)
            {
                var y = p.Y(i / 10.0);
                c.Fill(p.Left - 7, y, 6, 1, Ink);
                c.Text(p.Left - 10 - lw, y - th / 2, label, Ink, Scale);
            }
        }
        var xLabel = "SSD capacity (% of image)";
        c.Text(p.Left + (p.Right - p.Left - Canvas.TextWidth(xLabel, Scale)) / 2, p.Bottom + 10 + th + 12, xLabel, Ink, Scale);
        var yLabel = "I/O served (%)";
        c.TextUp(Pad, p.Top + (p.Bottom - p.Top + Canvas.TextWidth(yLabel, Scale)) / 2, yLabel, Ink, Scale);

        // Legend in the lower right, where a concave curve leaves room.
        var rowH = th + 8;
        var boxW = 16 + 28 + 8 + legend.Max(l => Canvas.TextWidth(l.Label, Scale)) + 8;
        var boxH = legend.Count * rowH + 8;
        var bx = p.Right - boxW - 10;
        var by = p.Bottom - boxH - 10;
        c.Fill(bx, by, boxW, boxH, Background);
        c.Rect(bx, by, boxW, boxH, Ink);
        for (var i = 0; i < legend.Count; i++)
        {
            var (color, label, thickness, dash) = legend[i];
            var ly = by + 8 + i * rowH + th / 2;
            c.Line(bx + 8, ly, bx + 36, ly, color, thickness, dash);
            c.Text(bx + 44, ly - th / 2, label, Ink, Scale);
        }
        return c;
    }
}
