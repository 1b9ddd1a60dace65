using System.Globalization;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Interop;

/// <summary>
/// qcowtier measure against qemu-img measure: the same figures and output (human and JSON) over cluster
/// size × refcount width × compat × preallocation, for an empty virtual size and for copies of images
/// with data. One qemu-img process per case.
/// </summary>
public sealed class MeasureMatrixTests
{
    public static TheoryData<int, int, string, string, string> SizeCases()
    {
        var data = new TheoryData<int, int, string, string, string>();
        var sizes = new[] { "1000", "10M", "3G", "1T" };
        var i = 0;
        foreach (var cs in new[] { 512, 4096, 65536, 2 << 20 })
        {
            foreach (var bits in new[] { 1, 16, 64 })
            {
                foreach (var prealloc in new[] { "off", "metadata", "falloc", "full" })
                {
                    var compat = bits == 16 && prealloc is "off" or "full" ? "0.10" : "1.1";
                    data.Add(cs, bits, compat, prealloc, sizes[i++ % sizes.Length]);
                }
            }
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(SizeCases))]
    public void Empty_image_figures_equal_qemu_img(int cs, int bits, string compat, string prealloc, string size)
    {
        var o = string.Create(CultureInfo.InvariantCulture, $"cluster_size={cs},refcount_bits={bits},compat={compat},preallocation={prealloc}");
        var json = cs % 3 == 1; // alternate the output formats over the matrix
        string[] args = json ? ["measure", "--output=json", "-O", "qcow2", "-o", o, "--size", size] : ["measure", "-O", "qcow2", "-o", o, "--size", size];
        var theirs = Qemu.Img(args);
        var ours = CliHarness.Run(args);
        ours.ExitCode.Should().Be(theirs.ExitCode, theirs.StdErr);
        ours.StdOut.Should().Be(theirs.StdOut);
        ours.StdErr.Should().Be(CliHarness.AsOurs(theirs.StdErr));
    }

    public static TheoryData<string, bool> SourceCases() => new()
    {
        { "", false },
        { "", true },
        { "-o cluster_size=4096", false },
        { "-o cluster_size=512,refcount_bits=1", true },
        { "-o cluster_size=2M", false },
        { "-o compat=0.10", false },
        { "-o compat=0.10", true },
        { "-o preallocation=metadata", false },
        { "-o preallocation=falloc,cluster_size=4096", true },
        { "-o preallocation=full,refcount_bits=64", false },
        { "-O raw", false },
        { "-f raw", false },
    };

    [Theory]
    [MemberData(nameof(SourceCases))]
    public void Copy_figures_equal_qemu_img(string options, bool json)
    {
        using var dir = new TempDir();
        var source = CliHarness.MixedQcow(dir, options: "cluster_size=16384");
        var args = new List<string> { "measure" };
        if (json)
        {
            args.Add("--output=json");
        }
        var extra = options.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (!extra.Contains("-O"))
        {
            args.AddRange(["-O", "qcow2"]);
        }
        args.AddRange(extra);
        args.Add(source);
        var theirs = Qemu.Img([.. args]);
        var ours = CliHarness.Run([.. args]);
        ours.ExitCode.Should().Be(theirs.ExitCode, theirs.StdErr);
        ours.StdOut.Should().Be(theirs.StdOut);
    }

    /// <summary>A source with persistent bitmaps: "bitmaps size" counts them as QEMU does, for several target cluster sizes.</summary>
    [Theory]
    [InlineData("")]
    [InlineData("cluster_size=4k")]
    [InlineData("cluster_size=2M")]
    public void Bitmaps_size_equals_qemu_img(string options)
    {
        using var dir = new TempDir();
        var path = dir.File("bm.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "1G").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "64k", path, "b1").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "512", path, "a-longer-bitmap-name").EnsureSuccess();
        foreach (var json in new[] { false, true })
        {
            var args = new List<string> { "measure" };
            if (json)
            {
                args.Add("--output=json");
            }
            args.AddRange(["-O", "qcow2"]);
            if (options.Length > 0)
            {
                args.AddRange(["-o", options]);
            }
            args.Add(path);
            var theirs = Qemu.Img([.. args]).EnsureSuccess().StdOut;
            CliHarness.Run([.. args]).StdOut.Should().Be(theirs);
            theirs.Should().NotContain("bitmaps size: 0").And.NotContain("\"bitmaps\": 0");
        }
    }

    [Fact]
    public void Library_measure_of_an_image_equals_qemu_img()
    {
        using var dir = new TempDir();
        var source = CliHarness.MixedQcow(dir);
        using var img = QcowImage.Open(source, new QcowOpenOptions { ReadOnly = true });
        var m = img.Measure(new QcowCreateOptions { ClusterSize = 4096 });
        var theirs = Qemu.Img("measure", "-O", "qcow2", "-o", "cluster_size=4096", source).EnsureSuccess().StdOut;
        theirs.Should().Contain($"required size: {m.RequiredBytes}\n").And.Contain($"fully allocated size: {m.FullyAllocatedBytes}\n");
        QcowImage.Measure(10L << 30).Should().Be(new QcowMeasurement(1900544, 10739318784));
    }

    [Theory]
    [InlineData("measure", "-O", "qcow2")]
    [InlineData("measure", "-O", "qcow2", "--size", "1G", "x.qcow2")]
    [InlineData("measure", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1", "--size", "1G")]
    [InlineData("measure", "-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G")]
    [InlineData("measure", "-O", "qcow2", "-o", "cluster_size=512", "--size", "10T")]
    [InlineData("measure", "-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G")]
    public void Errors_are_qemu_img_s(params string[] args)
    {
        var theirs = Qemu.Img(args);
        var ours = CliHarness.Run(args);
        ours.ExitCode.Should().Be(theirs.ExitCode).And.Be(1);
        ours.StdErr.Should().Be(CliHarness.AsOurs(theirs.StdErr));
    }
}
