using System.Text.RegularExpressions;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Hostile;

/// <summary>
/// Discards and zeroing over every kind of cluster — normal, compressed, zero with and without a host
/// cluster, unallocated — on version 2 and 3 images (the ground of QEMU's iotest 290, written afresh):
/// the same qemu-io commands through `qcowtier io` and through qemu-io give the same content and map.
/// </summary>
public sealed class DiscardKindsTests
{
    private const int Cs = 65536;

    private static string StripOffsets(string mapJson) => Regex.Replace(mapJson, @", ""offset"": \d+", "");

    private static readonly string[] Setup =
    [
        $"write -P 1 0 {4 * Cs}",            // normal clusters 0-3
        $"write -c -P 2 {4 * Cs} {Cs}",      // a compressed cluster 4
        $"write -c -P 3 {5 * Cs} {Cs}",      // and 5
        $"write -P 4 {6 * Cs} {2 * Cs}",     // 6-7, then zeroed keeping their host clusters
        $"write -z {6 * Cs} {2 * Cs}",
        $"write -z {8 * Cs} {Cs}",           // 8: zero flag without a host cluster (v3) / unallocated (v2)
    ];

    private static readonly string[] Operations =
    [
        $"discard {Cs} {Cs}",                // a normal cluster
        $"discard {4 * Cs} {Cs}",            // a compressed one
        $"write -z -u {5 * Cs} {Cs}",        // zeroing a compressed one, unmapping
        $"discard {6 * Cs} {Cs}",            // a zero cluster with a host cluster
        $"write -z -u {7 * Cs} {Cs}",        // the same, unmapping
        $"discard {8 * Cs} {2 * Cs}",        // zero / unallocated
        $"discard {2 * Cs + 512} {Cs}",      // unaligned: only whole clusters go
        $"write -z {3 * Cs + 4096} 4096",    // partial zeroing writes zeroes
    ];

    [Theory]
    [InlineData("1.1")]
    [InlineData("0.10")]
    public void DiscardAndZeroOverEveryClusterKindMatchQemu(string compat)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        foreach (var p in new[] { ours, theirs })
        {
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"compat={compat}", p, (16 * Cs).ToString(System.Globalization.CultureInfo.InvariantCulture)).EnsureSuccess();
            CliHarness.QemuIo(p, "qcow2", Setup);
        }
        var args = new List<string> { "io", "-f", "qcow2" };
        foreach (var c in Operations)
        {
            args.AddRange(["-c", c]);
        }
        var r = CliHarness.Run([.. args, ours]);
        r.ExitCode.Should().Be(0, r.StdOut + r.StdErr);
        CliHarness.QemuIo(theirs, "qcow2", Operations);

        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        StripOffsets(QemuTools.Img("map", "--output=json", ours).StdOut)
            .Should().Be(StripOffsets(QemuTools.Img("map", "--output=json", theirs).StdOut), $"compat={compat}: the same clusters end data, zero or unallocated");
        var check = QemuTools.Img("check", "--output=json", ours).StdOut;
        check.Should().NotContain("compressed-clusters", "both compressed clusters were discarded or zeroed (qemu-img omits a zero count)");
        check.Should().Contain("\"allocated-clusters\": 3", "clusters 0, 2 and 3 keep their data");
    }
}
