using System.Globalization;

namespace QcowTier.Cli.Infrastructure;

/// <summary>QEMU's ways of printing sizes and times, so human output matches qemu-img and qemu-io.</summary>
internal static class HumanUnits
{
    private static readonly string[] Prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

    /// <summary>size_to_str: three significant digits ("%0.3g"), switching unit once the value reaches 1000.</summary>
    public static string SizeToStr(long bytes)
    {
        var val = (ulong)bytes;
        var i = 0;
        if (val != 0)
        {
            // frexp(val / (1000/1024)) gives floor(log2(val * 1.024)) + 1.
            var exp = (int)Math.Floor(Math.Log2(val / (1000.0 / 1024.0))) + 1;
            i = (exp - 1) / 10;
        }
        return FormatG3((double)val / (1UL << (i * 10))) + " " + Prefixes[i] + "B";
    }

    /// <summary>C's "%0.3g" for non-negative values, rounded exactly as glibc rounds.</summary>
    internal static string FormatG3(double v)
    {
        if (v == 0)
        {
            return "0";
        }
        // The exponent is that of the value once rounded to three digits (9.996 becomes 10.0).
        var x = (int)Math.Floor(Math.Log10(v));
        var digits = CFormat.Round(v, 2 - x);
        if (digits >= 1000)
        {
            x++;
            digits = CFormat.Round(v, 2 - x);
        }
        else if (digits < 100)
        {
            x--;
            digits = CFormat.Round(v, 2 - x);
        }
        if (x < -4 || x >= 3)
        {
            var d = digits.ToString(CultureInfo.InvariantCulture);
            return TrimZeros(d[..1] + "." + d[1..]) + "e" + (x < 0 ? "-" : "+") + Math.Abs(x).ToString("00", CultureInfo.InvariantCulture);
        }
        return TrimZeros(CFormat.Fixed(v, 2 - x));
    }

    private static string TrimZeros(string s)
        => s.Contains('.', StringComparison.Ordinal) ? s.TrimEnd('0').TrimEnd('.') : s;

    /// <summary>qemu-io's cvtstr: "%.3f" with a binary unit, ".000" dropped; plain "%f bytes" below 1 KiB.</summary>
    public static string Cvtstr(double value)
    {
        string num;
        string suffix;
        (double Scale, string Suffix)[] units =
        [
            (1L << 60, " EiB"), (1L << 50, " PiB"), (1L << 40, " TiB"), (1L << 30, " GiB"), (1L << 20, " MiB"), (1L << 10, " KiB"),
        ];
        var unit = units.FirstOrDefault(u => value >= u.Scale);
        if (unit.Suffix is not null)
        {
            num = CFormat.Fixed(value / unit.Scale, 3);
            suffix = unit.Suffix;
        }
        else
        {
            num = CFormat.Fixed(value, 6);
            suffix = " bytes";
        }
        var trim = num.IndexOf(".000", StringComparison.Ordinal);
        return trim >= 0 ? num[..trim] + suffix : num + suffix;
    }

    /// <summary>qemu-io's timestr: "SS.ss sec" under a second, "H:MM:SS.ss" from one second on (or always with -C).</summary>
    public static string Timestr(TimeSpan t, bool fixedFormat)
    {
        var totalSeconds = (long)Math.Floor(t.TotalSeconds);
        var frac = t.TotalSeconds - totalSeconds;
        if (fixedFormat || totalSeconds > 0)
        {
            var h = totalSeconds / 3600;
            var m = totalSeconds / 60 % 60;
            var s = totalSeconds % 60 + frac;
            return $"{h}:{m:00}:{CFormat.Fixed(s, 2, 5, '0')}";
        }
        return CFormat.Fixed(frac, 2, 5, '0') + " sec";
    }
}
