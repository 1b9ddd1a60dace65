using QcowTier.Tests.Infrastructure;
using static QcowTier.Tests.Backing.BackingKit;

namespace QcowTier.Tests.Backing;

/// <summary>Chains built by qemu-img read exactly as QEMU reads them.</summary>
public sealed class BackingReadTests
{
    [Theory]
    [InlineData("4M", "1.1")]   // top larger than its backing, which is larger than the base
    [InlineData("1536K", "1.1")] // top smaller than its backing
    [InlineData("4M", "0.10")]
    public async Task ThreeLayerChainReadsAsQemu(string topSize, string compat)
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir, topSize, compat);
        var expected = QemuContent(dir, top);
        ShouldEqual(OurContent(top), expected);
        ShouldEqual(await OurContentAsync(top), expected);
    }

    [Fact]
    public void DeepChainWithProbedFormatsAndRelativeNamesInOtherFolders()
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("a"));
        Directory.CreateDirectory(dir.File("b"));
        var layers = new List<string> { dir.File("a/l0.qcow2") };
        Img("create", "-q", "-f", "qcow2", layers[0], "1M");
        Io("qcow2", layers[0], "write -P 0x40 0 1M");
        for (var i = 1; i <= 5; i++)
        {
            var folder = i % 2 == 0 ? "a" : "b";
            var prevFolder = (i - 1) % 2 == 0 ? "a" : "b";
            var path = dir.File($"{folder}/l{i}.qcow2");
            Img("create", "-q", "-f", "qcow2", "-b", $"../{prevFolder}/l{i - 1}.qcow2", "-F", "qcow2", path, "1M");
            StripBackingFormat(path); // no backing format: the format is probed
            Io("qcow2", path, $"write -P 0x{0x40 + i:x} {i * 100}k 50k");
            layers.Add(path);
        }
        using var image = QcowImage.Open(layers[^1], new QcowOpenOptions { ReadOnly = true });
        image.BackingFormat.Should().BeNull();
        image.GetBackingChain().Select(l => (l.Depth, l.Format)).Should().Equal(Enumerable.Range(1, 5).Select(d => (d, "qcow2")));
        var buffer = new byte[image.Size];
        image.Read(0, buffer);
        ShouldEqual(buffer, QemuContent(dir, layers[^1]));
    }

    [Fact]
    public void ChainMapReportsDepthsAsQemuImgMap()
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir);
        var qemu = Qemu.Img("map", "--output=json", top).EnsureSuccess().StdOut;
        using var image = QcowImage.Open(top, new QcowOpenOptions { ReadOnly = true });
        var ours = image.GetChainMap();
        // Every byte's (depth, zero-or-data) must agree with qemu-img map's entries.
        foreach (var line in qemu.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var start = Field(line, "start");
            var length = Field(line, "length");
            var depth = Field(line, "depth");
            var data = line.Contains("\"data\": true", StringComparison.Ordinal);
            foreach (var e in ours.Where(e => e.Start < start + length && e.Start + e.Length > start))
            {
                e.Depth.Should().Be((int)depth, $"at {e.Start} ({line})");
                (e.Kind == QcowExtentKind.Data).Should().Be(data, $"at {e.Start} ({line})");
            }
        }
    }

    private static long Field(string line, string name)
    {
        var i = line.IndexOf($"\"{name}\": ", StringComparison.Ordinal) + name.Length + 4;
        var j = i;
        while (j < line.Length && char.IsAsciiDigit(line[j]))
        {
            j++;
        }
        return long.Parse(line[i..j], System.Globalization.CultureInfo.InvariantCulture);
    }

    [Fact]
    public void InfoPropertiesNameTheBackingFile()
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir);
        using var image = QcowImage.Open(top, new QcowOpenOptions { ReadOnly = true });
        image.BackingFile.Should().Be(dir.File("mid.qcow2"));
        image.BackingFormat.Should().Be("qcow2");
        image.GetInfo().BackingFile.Should().Be(dir.File("mid.qcow2"));
        image.GetInfo().FullBackingFileName.Should().Be(dir.File("mid.qcow2"));
        image.GetInfo().BackingFormat.Should().Be("qcow2");
        var chain = image.GetBackingChain();
        chain.Should().HaveCount(2);
        chain[1].FileName.Should().Be(dir.File("base.raw"));
        chain[1].Format.Should().Be("raw");
        chain[1].VirtualSize.Should().Be(2 << 20);
    }

    [Fact]
    public void ExportToFlattensTheChain()
    {
        using var dir = new TempDir();
        var top = ThreeLayers(dir);
        var expected = QemuContent(dir, top);
        using var image = QcowImage.Open(top, new QcowOpenOptions { ReadOnly = true });
        image.ExportTo(dir.File("flat.raw"), raw: true);
        image.ExportTo(dir.File("flat.qcow2"));
        ShouldEqual(File.ReadAllBytes(dir.File("flat.raw")), expected);
        ShouldEqual(OurContent(dir.File("flat.qcow2")), expected);
        Qemu.Img("info", dir.File("flat.qcow2")).EnsureSuccess().StdOut.Should().NotContain("backing file");
        Qemu.AssertClean(dir.File("flat.qcow2"));
    }
}
