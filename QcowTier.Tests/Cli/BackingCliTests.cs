using QcowTier.Tests.Infrastructure;
using static QcowTier.Tests.Cli.CliHarness;

namespace QcowTier.Tests.Cli;

/// <summary>The verbs over backing chains, byte for byte against qemu-img.</summary>
public sealed class BackingCliTests
{
    /// <summary>raw base with holes (3 MiB) ← d/mid.qcow2 ("../base.raw", 4k clusters, 4 MiB) ← top.qcow2 ("d/mid.qcow2", 5 MiB).</summary>
    private static string Chain(TempDir dir)
    {
        var b = dir.File("base.raw");
        Qemu.Img("create", "-q", "-f", "raw", b, "3M").EnsureSuccess();
        QemuIo(b, "raw", "write -P 3 1M 64k", "write -P 4 2M 8k");
        Directory.CreateDirectory(dir.File("d"));
        var mid = dir.File("d/mid.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "../base.raw", "-F", "raw", mid, "4M").EnsureSuccess();
        QemuIo(mid, "qcow2", "write -P 5 0 5k", "write -z 2M 64k", "write -P 6 3500k 4k");
        var top = dir.File("top.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-b", "d/mid.qcow2", "-F", "qcow2", top, "5M").EnsureSuccess();
        QemuIo(top, "qcow2", "write -P 9 3M 10k", "write -z 64k 64k");
        return top;
    }

    private static void SameAsQemu(string[] args)
    {
        var ours = Run(args);
        var theirs = Qemu.Img(args);
        ours.ExitCode.Should().Be(theirs.ExitCode, ours.StdErr + theirs.StdErr);
        ours.StdOut.Should().Be(theirs.StdOut, string.Join(' ', args));
    }

    [Fact]
    public void Info_map_and_backing_chain_print_as_qemu_img()
    {
        using var dir = new TempDir();
        var top = Chain(dir);
        var mid = dir.File("d/mid.qcow2");
        foreach (var path in new[] { top, mid })
        {
            SameAsQemu(["info", path]);
            SameAsQemu(["info", "--output=json", path]);
            SameAsQemu(["info", "--backing-chain", path]);
            SameAsQemu(["info", "--backing-chain", "--output=json", path]);
            SameAsQemu(["map", path]);
            SameAsQemu(["map", "--output=json", path]);
        }
        SameAsQemu(["map", "--output=json", "--start-offset=1000k", "--max-length=2M", top]);
    }

    [Fact]
    public void Info_names_a_missing_backing_file_and_map_reports_it_missing()
    {
        using var dir = new TempDir();
        var top = dir.File("top.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M").EnsureSuccess();
        SameAsQemu(["info", top]);
        SameAsQemu(["info", "--output=json", top]);
        Run("map", top).ShouldBeOneLineError($"Could not open '{top}': Could not open backing file: Could not open '{dir.File("gone.qcow2")}': No such file or directory");
        var chain = Run("info", "--backing-chain", top);
        chain.ExitCode.Should().Be(Qemu.Img("info", "--backing-chain", top).ExitCode);
        chain.StdOut.Should().BeEmpty("as qemu-img, the whole chain is opened before anything is printed");
        chain.ShouldBeOneLineError("gone.qcow2");
    }

    [Fact]
    public void Info_backing_chain_stops_at_a_loop()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", b, "-F", "qcow2", a, "1M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", a, "-F", "qcow2", b, "1M").EnsureSuccess();
        var theirs = Qemu.Img("info", "--backing-chain", a);
        var ours = Run("info", "--backing-chain", a);
        ours.ExitCode.Should().Be(1);
        ours.StdErr.Should().Be(AsOurs(theirs.StdErr));
        Run("map", a).ShouldBeOneLineError("a loop of backing files");
    }

    [Fact]
    public void Create_with_a_backing_file_prints_and_makes_what_qemu_img_does()
    {
        using var dir = new TempDir();
        var top = Chain(dir);
        var path = dir.File("new.qcow2");
        string[] args = ["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", path];
        var ours = Run(args);
        ours.ExitCode.Should().Be(0, ours.StdErr);
        Qemu.AssertClean(path);
        static string Info(string p) => string.Join('\n', Qemu.Img("info", "--output=json", p).EnsureSuccess().StdOut.Split('\n').Where(l => !l.Contains("actual-size", StringComparison.Ordinal)));
        var ourInfo = Info(path);
        File.Delete(path);
        var theirs = Qemu.Img(args).EnsureSuccess();
        ours.StdOut.Should().Be(theirs.StdOut);
        Info(path).Should().Be(ourInfo);
        _ = top;
    }

    [Theory]
    [InlineData("create -f qcow2 -b missing.qcow2 -F qcow2 {0}")]
    [InlineData("create -f qcow2 -b top.qcow2 {0}")]
    [InlineData("create -f raw -b top.qcow2 -F qcow2 {0}")]
    [InlineData("create -f qcow2 -u -b top.qcow2 -F qcow2 {0}")]
    public void Create_refusals_read_as_qemu_img(string command)
    {
        using var dir = new TempDir();
        Chain(dir);
        var args = string.Format(System.Globalization.CultureInfo.InvariantCulture, command, dir.File("new.img")).Split(' ');
        var theirs = Qemu.Img(args);
        var ours = Run(args);
        theirs.ExitCode.Should().Be(1);
        ours.ExitCode.Should().Be(1);
        ours.StdErr.Trim().Should().Be(AsOurs(theirs.StdErr).Split('\n')[0].Trim());
    }

    [Fact]
    public void Convert_flattens_and_compare_reads_through_the_chain()
    {
        using var dir = new TempDir();
        var top = Chain(dir);
        var theirs = dir.File("theirs.raw");
        Qemu.Img("convert", "-O", "raw", top, theirs).EnsureSuccess();
        var ours = dir.File("ours.raw");
        Run("convert", "-O", "raw", top, ours).ExitCode.Should().Be(0);
        File.ReadAllBytes(ours).Should().Equal(File.ReadAllBytes(theirs));
        var flat = dir.File("flat.qcow2");
        Run("convert", "-O", "qcow2", top, flat).ExitCode.Should().Be(0);
        Qemu.Img("info", flat).EnsureSuccess().StdOut.Should().NotContain("backing file");
        Qemu.AssertSameContent(flat, theirs, "qcow2", "raw");
        SameAsQemu(["compare", top, theirs]);
        QemuIo(theirs, "raw", "write -P 7 1030k 512");
        SameAsQemu(["compare", top, theirs]);
        SameAsQemu(["compare", "-s", top, dir.File("d/mid.qcow2")]);
    }

    [Fact]
    public void Convert_with_B_copies_the_top_layer_as_qemu_img()
    {
        using var dir = new TempDir();
        var top = Chain(dir);
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        Run("convert", "-O", "qcow2", "-B", "d/mid.qcow2", "-F", "qcow2", top, ours).ExitCode.Should().Be(0);
        Qemu.Img("convert", "-O", "qcow2", "-B", "d/mid.qcow2", "-F", "qcow2", top, theirs).EnsureSuccess();
        Qemu.AssertClean(ours);
        Qemu.Img("map", "--output=json", ours).StdOut.Should().Be(Qemu.Img("map", "--output=json", theirs).StdOut);
        Qemu.AssertSameContent(ours, top);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Rebase_and_commit_leave_what_qemu_img_leaves(bool unsafeRebase)
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("a"));
        Directory.CreateDirectory(dir.File("b"));
        foreach (var side in new[] { "a", "b" })
        {
            Qemu.Img("create", "-q", "-f", "raw", dir.File($"{side}/base.raw"), "2M").EnsureSuccess();
            QemuIo(dir.File($"{side}/base.raw"), "raw", "write -P 1 0 2M");
            Qemu.Img("create", "-q", "-f", "qcow2", dir.File($"{side}/other.qcow2"), "1M").EnsureSuccess();
            QemuIo(dir.File($"{side}/other.qcow2"), "qcow2", "write -P 1 0 512k");
            Qemu.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "base.raw", "-F", "raw", dir.File($"{side}/top.qcow2"), "3M").EnsureSuccess();
            QemuIo(dir.File($"{side}/top.qcow2"), "qcow2", "write -P 2 100k 1k", "write -z 700k 40k", "write -P 3 2500k 8k");
        }
        string[] rebase = ["rebase", .. unsafeRebase ? new[] { "-u" } : [], "-b", "other.qcow2", "-F", "qcow2"];
        var ours = Run([.. rebase, dir.File("a/top.qcow2")]);
        var theirs = Qemu.Img([.. rebase, dir.File("b/top.qcow2")]);
        ours.ExitCode.Should().Be(0, ours.StdErr);
        theirs.EnsureSuccess();
        ours.StdOut.Should().Be(theirs.StdOut);
        Qemu.AssertClean(dir.File("a/top.qcow2"));
        Qemu.AssertSameContent(dir.File("a/top.qcow2"), dir.File("b/top.qcow2"));

        ours = Run("commit", dir.File("a/top.qcow2"));
        theirs = Qemu.Img("commit", dir.File("b/top.qcow2"));
        ours.ExitCode.Should().Be(0, ours.StdErr);
        ours.StdOut.Should().Be(theirs.EnsureSuccess().StdOut);
        Qemu.AssertClean(dir.File("a/other.qcow2"));
        Qemu.AssertSameContent(dir.File("a/other.qcow2"), dir.File("b/other.qcow2"));
        Qemu.AssertSameContent(dir.File("a/top.qcow2"), dir.File("b/top.qcow2"));
        SameAsQemu(["map", "--output=json", dir.File("a/top.qcow2")]);
    }

    [Fact]
    public void Rebase_and_commit_refusals_read_as_qemu_img()
    {
        using var dir = new TempDir();
        var plain = dir.File("plain.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", plain, "1M").EnsureSuccess();
        foreach (var args in new[]
        {
            new[] { "commit", plain },
            ["rebase", "-b", "x.raw", plain],
            ["rebase", "-b", "nonexist", "-F", "raw", plain],
        })
        {
            var theirs = Qemu.Img(args);
            var ours = Run(args);
            ours.ExitCode.Should().Be(theirs.ExitCode);
            ours.StdErr.Trim().Should().Be(AsOurs(theirs.StdErr).Split('\n')[0].Trim());
        }
    }

    [Fact]
    public void Growing_over_a_longer_backing_file_zeroes_the_new_area_as_qemu_img()
    {
        using var dir = new TempDir();
        var b = dir.File("big.raw");
        Qemu.Img("create", "-q", "-f", "raw", b, "2M").EnsureSuccess();
        QemuIo(b, "raw", "write -P 7 0 2M");
        foreach (var name in new[] { "ours.qcow2", "theirs.qcow2" })
        {
            Qemu.Img("create", "-q", "-f", "qcow2", "-b", "big.raw", "-F", "raw", dir.File(name), "1000k").EnsureSuccess();
        }
        Run("resize", dir.File("ours.qcow2"), "3M").ExitCode.Should().Be(0);
        Qemu.Img("resize", dir.File("theirs.qcow2"), "3M").EnsureSuccess();
        Qemu.AssertClean(dir.File("ours.qcow2"));
        Qemu.AssertSameContent(dir.File("ours.qcow2"), dir.File("theirs.qcow2"));
        Qemu.Img("map", "--output=json", dir.File("ours.qcow2")).StdOut.Should().Be(Qemu.Img("map", "--output=json", dir.File("theirs.qcow2")).StdOut);
    }

    [Fact]
    public void Preallocation_with_a_backing_file_is_refused_as_by_qemu_img()
    {
        using var dir = new TempDir();
        Qemu.Img("create", "-q", "-f", "raw", dir.File("b.raw"), "1M").EnsureSuccess();
        string[] args = ["create", "-f", "qcow2", "-o", "preallocation=metadata", "-b", "b.raw", "-F", "raw", dir.File("o.qcow2")];
        var theirs = Qemu.Img(args);
        var ours = Run(args);
        theirs.ExitCode.Should().Be(1);
        ours.ExitCode.Should().Be(1);
        ours.StdErr.Should().Be(AsOurs(theirs.StdErr));
        ours.StdOut.Should().Be(theirs.StdOut);
    }

    [Theory]
    [InlineData("cluster_size=512")]
    [InlineData("cluster_size=512,compat=0.10")]
    [InlineData("cluster_size=65536")]
    [InlineData("cluster_size=4096,compat=0.10")]
    public void Created_overlay_headers_are_byte_for_byte_qemu_img_s(string options)
    {
        using var dir = new TempDir();
        Qemu.Img("create", "-q", "-f", "raw", dir.File("base.raw"), "1M").EnsureSuccess();
        Run("create", "-q", "-f", "qcow2", "-o", options, "-b", "base.raw", "-F", "raw", dir.File("ours.qcow2")).ExitCode.Should().Be(0);
        Qemu.Img("create", "-q", "-f", "qcow2", "-o", options, "-b", "base.raw", "-F", "raw", dir.File("theirs.qcow2")).EnsureSuccess();
        var ours = File.ReadAllBytes(dir.File("ours.qcow2"));
        var theirs = File.ReadAllBytes(dir.File("theirs.qcow2"));
        var cluster = int.Parse(options.Split(',')[0].Split('=')[1], System.Globalization.CultureInfo.InvariantCulture);
        // l1_size differs for every image (we size the L1 table to its cluster; not a backing matter): mask it.
        ours.AsSpan(36, 4).Clear();
        theirs.AsSpan(36, 4).Clear();
        ours.AsSpan(0, cluster).SequenceEqual(theirs.AsSpan(0, cluster)).Should().BeTrue("the header cluster (extensions, backing file name) matches qemu-img's");
        Qemu.AssertClean(dir.File("ours.qcow2"));
    }

    [Fact]
    public void Unsafe_rebase_repairs_a_missing_backing_file_as_qemu_img()
    {
        using var dir = new TempDir();
        foreach (var name in new[] { "ours.qcow2", "theirs.qcow2" })
        {
            Qemu.Img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", dir.File(name), "1M").EnsureSuccess();
        }
        var check = Run("check", dir.File("ours.qcow2"));
        check.StdErr.Should().Be(AsOurs(Qemu.Img("check", dir.File("ours.qcow2")).StdErr));
        Run("rebase", "-u", "-b", "x.raw", "-F", "raw", dir.File("ours.qcow2")).ExitCode.Should().Be(0);
        Qemu.Img("rebase", "-u", "-b", "x.raw", "-F", "raw", dir.File("theirs.qcow2")).EnsureSuccess();
        File.ReadAllBytes(dir.File("ours.qcow2")).AsSpan(0, 512).SequenceEqual(File.ReadAllBytes(dir.File("theirs.qcow2")).AsSpan(0, 512)).Should().BeTrue();
    }
}
