using QcowTier.Tests.Compression;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>convert -c, create -o compression_type, io write -c, map and info on compressed images, side by side with qemu-img.</summary>
public sealed class CompressionCliTests
{
    private static string StripOffsets(string mapJson)
        => System.Text.RegularExpressions.Regex.Replace(mapJson, @", ""offset"": \d+", "");

    [Theory]
    [InlineData("zlib", "65536")]
    [InlineData("zstd", "65536")]
    [InlineData("zlib", "4096")]
    [InlineData("zstd", "2M")]
    public void ConvertCompressedMatchesQemuImg(string type, string clusterSize)
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        // Add compressible and incompressible data to the mixed image.
        var rnd = CompressionKit.WriteRaw(dir, CompressionKit.MixedContent(3 << 20, 65536, 2), "mixed.raw");
        CliHarness.QemuIo(src, "qcow2", $"write -s {rnd} 8M 3M");
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        var options = $"compression_type={type},cluster_size={clusterSize}";
        var r = CliHarness.Run("convert", "-c", "-O", "qcow2", "-o", options, src, ours);
        r.ExitCode.Should().Be(0, r.StdErr);
        Qemu.Img("convert", "-c", "-O", "qcow2", "-o", options, src, theirs).EnsureSuccess();
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(src, ours);
        if (type == "zstd")
        {
            CompressionKit.QemuCompressedClusters(ours).Should().Be(CompressionKit.QemuCompressedClusters(theirs), "the same clusters compress");
        }
        else
        {
            // QEMU deflates with a 4 KiB window, we with 32 KiB: repeats 10,000 bytes apart shrink only here.
            CompressionKit.QemuCompressedClusters(ours).Should().BeGreaterThanOrEqualTo(CompressionKit.QemuCompressedClusters(theirs));
        }
        if (type == "zstd")
        {
            StripOffsets(Qemu.Img("map", "--output=json", ours).StdOut)
                .Should().Be(StripOffsets(Qemu.Img("map", "--output=json", theirs).StdOut));
        }
        // Our map and info on QEMU's compressed image print what qemu-img prints.
        CliHarness.Run("map", "--output=json", theirs).StdOut.Should().Be(Qemu.Img("map", "--output=json", theirs).StdOut);
        var info = CliHarness.Run("info", theirs).StdOut;
        info.Should().Contain("compression type: " + type);
        var human = CliHarness.Run("map", theirs);
        human.ShouldBeOneLineError("File contains external, encrypted or compressed clusters.");
        // Sizes are of the same order as QEMU's (the encoders differ in detail).
        new FileInfo(ours).Length.Should().BeLessThan(new FileInfo(theirs).Length * 2);
    }

    [Fact]
    public void CreateWithZstdAndIoWriteCompressedAsQemuIo()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", ours, "1M").ExitCode.Should().Be(0);
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", theirs, "1M").EnsureSuccess();
        CliHarness.Run("info", ours).StdOut.Should().Contain("compression type: zstd");
        string[] commands = ["write -c -P 1 0 64k", "write -c -P 2 0 64k", "write -c -P 2 512 64k", "write -c -P 2 65536 4k", "write -c -P 3 131072 128k"];
        var args = new List<string> { "io", "-f", "qcow2" };
        var qargs = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.AddRange(["-c", c]);
            qargs.AddRange(["-c", c]);
        }
        args.Add(ours);
        qargs.Add(theirs);
        var r = CliHarness.Run([.. args]);
        var q = Qemu.Io([.. qargs]);
        static string Lines(string s) => string.Join('\n', s.Split('\n').Where(l => l.StartsWith("wrote", StringComparison.Ordinal) || l.Contains("failed", StringComparison.Ordinal)));
        Lines(r.StdOut).Should().Be(Lines(q.StdOut));
        Qemu.AssertClean(ours);
        Qemu.AssertSameContent(ours, theirs);
        Qemu.Img("map", "--output=json", ours).StdOut.Should().Be(Qemu.Img("map", "--output=json", theirs).StdOut);
    }

    [Fact]
    public void CompressionRefusalsAsQemuImg()
    {
        using var dir = new TempDir();
        var src = CliHarness.MixedQcow(dir, "src.qcow2");
        CliHarness.Run("convert", "-c", "-O", "raw", src, dir.File("x.raw")).ShouldBeOneLineError("Compression not supported for this file format");
        File.Exists(dir.File("x.raw")).Should().BeFalse();
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "compat=0.10,compression_type=zstd", dir.File("v2.qcow2"), "1M")
            .ShouldBeOneLineError("Non-zlib compression type is only supported with compatibility level 1.1 and above");
        CliHarness.Run("create", "-q", "-f", "qcow2", "-o", "compression_type=lz4", dir.File("lz.qcow2"), "1M")
            .ShouldBeOneLineError("Parameter 'compression-type' does not accept value 'lz4'");
    }
}
