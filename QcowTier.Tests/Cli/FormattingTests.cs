using CsCheck;
using QcowTier.Cli.Infrastructure;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>The printf-compatible formatting the CLI relies on, checked against the C library's printf.</summary>
public sealed class FormattingTests
{
    private static string[] Printf(string format, IEnumerable<double> values)
        => Qemu.Run("printf", [format + "\\n", .. values.Select(HexFloat)]).EnsureSuccess().StdOut.TrimEnd('\n').Split('\n');

    /// <summary>C99 hex notation, so printf (which reads long doubles) sees exactly our double.</summary>
    private static string HexFloat(double v)
    {
        if (v == 0)
        {
            return "0x0p+0";
        }
        var bits = BitConverter.DoubleToInt64Bits(v);
        var exponent = (int)((bits >> 52) & 0x7FF) - 1023;
        var mantissa = bits & 0xFFFFFFFFFFFFFL;
        return exponent == -1023
            ? $"0x0.{mantissa:x13}p-1022"
            : $"0x1.{mantissa:x13}p{exponent:+0;-0}";
    }

    [Fact]
    public void Fixed_point_rounds_exactly_like_printf()
    {
        var values = Gen.Double[0, 1e6].Array[200].Single()
            .Concat([0.125, 0.375, 2.5, 0.005, 1.0 / 3, 99.995, 12.345, 0.0, 1e-7])
            .ToArray();
        foreach (var decimals in new[] { 2, 3, 4 })
        {
            var expected = Printf($"%.{decimals}f", values);
            values.Select(v => $"{v:R} -> {CFormat.Fixed(v, decimals)}").Should().Equal(values.Select((v, i) => $"{v:R} -> {expected[i]}"));
        }
    }

    [Fact]
    public void Three_significant_digits_match_printf_g()
    {
        var values = Gen.Double[0.5, 1200].Array[200].Single().Concat([1.125, 999.5, 999.4, 1.0, 100, 0.9765625, 12.25]).ToArray();
        var expected = Printf("%0.3g", values);
        values.Select(v => $"{v:R} -> {HumanUnits.FormatG3(v)}").Should().Equal(values.Select((v, i) => $"{v:R} -> {expected[i]}"));
    }

    [Fact]
    public void Sizes_parse_as_qemu_io_parses_them()
    {
        using var dir = new TempDir();
        var path = dir.File("big.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "2T").EnsureSuccess();
        string[] sizes = ["4k", "1.5M", "0x10", "1b", "1.k", "3", "1T", "1x", "-1", "1.5", "0x10k", "k", "2.5G", "0.5k", "077", "1e3"];
        string[] commands = [.. sizes.SelectMany(t => new[] { "-c", $"read -q {t} 0", "-c", $"read {t} 0" })];
        var q = Qemu.Io([.. commands, path]);
        var r = CliHarness.Run(["io", .. commands, path]);
        Lines(r.StdOut).Should().Equal(Lines(q.StdOut));
        r.ExitCode.Should().Be(q.ExitCode);

        static IEnumerable<string> Lines(string s) => s.Split('\n').Where(l => !l.Contains(" ops; ", StringComparison.Ordinal));
    }
}
