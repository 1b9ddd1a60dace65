using System.Globalization;
using QcowTier.Heat.Render;

namespace QcowTier.Benchmarks.Experiment;

/// <summary>A line series for <see cref="Plots.LineChart"/>; NaN values are gaps.</summary>
internal sealed record Series(string Name, int Color, double[] Values, bool Dashed = false);

/// <summary>Line charts drawn with the library's own canvas and PNG encoder (internal, visible to the benchmarks).</summary>
internal static class Plots
{
    public static readonly int[] Palette = [0x1f77b4, 0xd62728, 0x2ca02c, 0xff7f0e, 0x9467bd, 0x8c564b, 0x17becf];

    private static readonly Rgb Background = Rgb.Hex(0xffffff);
    private static readonly Rgb Ink = Rgb.Hex(0x202020);
    private static readonly Rgb Grid = Rgb.Hex(0xdddddd);

    public static void LineChart(string path, string title, string yLabel, string[] xLabels, IReadOnlyList<Series> series, bool logY, double? yMin = null, double? yMax = null)
    {
        const int width = 1040, height = 560, left = 90, right = 300, top = 50, bottom = 70;
        var c = new Canvas(width, height, Background);
        var plotW = width - left - right;
        var plotH = height - top - bottom;
        var values = series.SelectMany(s => s.Values).Where(v => !double.IsNaN(v) && (!logY || v > 0)).ToList();
        var lo = yMin ?? (values.Count > 0 ? values.Min() : 0);
        var hi = yMax ?? (values.Count > 0 ? values.Max() : 1);
        if (logY)
        {
            lo = Math.Pow(10, Math.Floor(Math.Log10(Math.Max(lo, 1e-6))));
            hi = Math.Pow(10, Math.Ceiling(Math.Log10(Math.Max(hi, lo * 10))));
        }
        else if (hi <= lo)
        {
            hi = lo + 1;
        }
        double Y(double v)
        {
            var t = logY ? (Math.Log10(v) - Math.Log10(lo)) / (Math.Log10(hi) - Math.Log10(lo)) : (v - lo) / (hi - lo);
            return top + plotH - t * plotH;
        }
        double X(int i) => left + (xLabels.Length == 1 ? plotW / 2.0 : i * (double)plotW / (xLabels.Length - 1));

        c.Text(left, 15, title, Ink, 2);
        // Grid and y ticks.
        var ticks = new List<double>();
        if (logY)
        {
            for (var d = lo; d <= hi * 1.0001; d *= 10)
            {
                ticks.Add(d);
                if (d * 3 < hi)
                {
                    ticks.Add(d * 3);
                }
            }
        }
        else
        {
            for (var i = 0; i <= 5; i++)
            {
                ticks.Add(lo + (hi - lo) * i / 5);
            }
        }
        foreach (var t in ticks)
        {
            var y = (int)Math.Round(Y(t));
            c.Line(left, y, left + plotW, y, Grid);
            var label = t.ToString(t >= 10 ? "0" : t >= 1 ? "0.#" : "0.###", CultureInfo.InvariantCulture);
            c.Text(left - 8 - Canvas.TextWidth(label, 1) * 2, y - 7, label, Ink, 2);
        }
        for (var i = 0; i < xLabels.Length; i++)
        {
            var x = (int)Math.Round(X(i));
            c.Line(x, top, x, top + plotH, Grid);
            c.Text(x - Canvas.TextWidth(xLabels[i], 2) / 2, top + plotH + 10, xLabels[i], Ink, 2);
        }
        c.Rect(left, top, plotW, plotH, Ink);
        c.TextUp(20, top + plotH / 2 + Canvas.TextWidth(yLabel, 2) / 2, yLabel, Ink, 2);

        var ly = top + 10;
        foreach (var s in series)
        {
            var col = Rgb.Hex(s.Color);
            for (var i = 0; i + 1 < s.Values.Length; i++)
            {
                var a = s.Values[i];
                var b = s.Values[i + 1];
                if (double.IsNaN(a) || double.IsNaN(b) || (logY && (a <= 0 || b <= 0)))
                {
                    continue;
                }
                c.Line((int)X(i), (int)Y(a), (int)X(i + 1), (int)Y(b), col, 3, s.Dashed ? 8 : 0);
            }
            for (var i = 0; i < s.Values.Length; i++)
            {
                var v = s.Values[i];
                if (!double.IsNaN(v) && (!logY || v > 0))
                {
                    c.Fill((int)X(i) - 4, (int)Y(v) - 4, 9, 9, col);
                }
            }
            c.Line(left + plotW + 15, ly + 7, left + plotW + 45, ly + 7, col, 3, s.Dashed ? 8 : 0);
            c.Text(left + plotW + 52, ly, s.Name, Ink, 2);
            ly += 24;
        }
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        using var f = File.Create(path);
        PngWriter.Write(f, c);
    }
}
