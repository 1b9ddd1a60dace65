using QcowTier.Heat.Render;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Heat;

/// <summary>The PNG pictures: decoded by an independent reader, then checked pixel by pixel where it matters.</summary>
public sealed class HeatRenderTests
{
    private static (byte R, byte G, byte B) C(Rgb c) => (c.R, c.G, c.B);

    private static DecodedPng Png(Action<Stream> write, string name)
    {
        var ms = new MemoryStream();
        write(ms);
        // Set QCOWTIER_HEAT_PNG_DIR to keep the pictures for a look.
        if (Environment.GetEnvironmentVariable("QCOWTIER_HEAT_PNG_DIR") is { Length: > 0 } keep)
        {
            File.WriteAllBytes(Path.Combine(keep, name), ms.ToArray());
        }
        return DecodedPng.Decode(ms.ToArray());
    }

    /// <summary>1 MiB in 4 KiB units: unit 0 very hot, unit 128 read once, the rest untouched.</summary>
    private static HeatMap StripMap()
    {
        var map = new HeatMap(1 << 20, 4096);
        for (var i = 0; i < 100; i++)
        {
            map.RecordRead(0, 4096);
        }
        map.RecordRead(128 * 4096, 4096);
        return map;
    }

    private static readonly TierExtent[] Placement =
    [
        new(0, 256 << 10, StorageTier.Ssd),
        new(256 << 10, 256 << 10, StorageTier.Hdd),
        new(512 << 10, 512 << 10, null),
    ];

    private static int Column(HeatRender.StripLayout layout, long offset) =>
        layout.X0 + HeatRender.ColumnOf(offset, 1 << 20, layout.X1 - layout.X0);

    [Fact]
    public void The_heat_strip_colours_hot_cold_and_untouched_units_and_the_tiers_below()
    {
        var map = StripMap();
        var png = Png(s => HeatRender.WriteHeatStrip(s, map, Placement, 512), "strip.png");
        var layout = HeatRender.LayoutStrip(512, tiers: true);
        png.Width.Should().Be(512);

        var y = layout.HeatY + HeatRender.HeatStripHeight / 2;
        png.Pixel(Column(layout, 0), y).Should().Be(C(HeatRender.RampColor(1)), "the hottest unit takes the top of the scale");
        var cold = HeatRender.RampColor(Math.Log(2) / Math.Log(1 + map.GetUnit(0).Score));
        png.Pixel(Column(layout, 128 * 4096), y).Should().Be(C(cold), "one read sits low on the log scale");
        png.Pixel(Column(layout, 200 * 4096), y).Should().Be(C(HeatRender.Untouched));
        png.Pixel(Column(layout, 128 * 4096), y).Should().NotBe(png.Pixel(Column(layout, 0), y));

        var ty = layout.TierY + HeatRender.TierStripHeight / 2;
        png.Pixel(Column(layout, 100 << 10), ty).Should().Be(C(HeatRender.SsdColor));
        png.Pixel(Column(layout, 300 << 10), ty).Should().Be(C(HeatRender.HddColor));
        png.Pixel(Column(layout, 700 << 10), ty).Should().Be(C(HeatRender.UnallocatedColor));

        // The column holding the SSD/HDD boundary blends the two in proportion to its bytes on each.
        var sw = layout.X1 - layout.X0;
        var x = HeatRender.ColumnOf(256 << 10, 1 << 20, sw);
        var start = (long)x * (1 << 20) / sw;
        var end = (long)(x + 1) * (1 << 20) / sw;
        var ssdPart = ((256 << 10) - start) / (double)(end - start);
        var blend = png.Pixel(layout.X0 + x, ty);
        ((double)blend.R).Should().BeApproximately(ssdPart * HeatRender.SsdColor.R + (1 - ssdPart) * HeatRender.HddColor.R, 1);
        ((double)blend.B).Should().BeApproximately(ssdPart * HeatRender.SsdColor.B + (1 - ssdPart) * HeatRender.HddColor.B, 1);

        // Frame and labels are drawn in ink.
        png.Pixel(layout.X0 - 1, y).Should().Be(C(HeatRender.Ink));
        InkIn(png, 0, HeatRender.Pad, png.Width, 14).Should().BeGreaterThan(100, "the title is written");
    }

    private static int InkIn(DecodedPng png, int x, int y, int w, int h) =>
        Enumerable.Range(y, h).Sum(yy => Enumerable.Range(x, w).Count(xx => png.Pixel(xx, yy) == C(HeatRender.Ink)));

    [Theory]
    [InlineData(320)]
    [InlineData(512)]
    [InlineData(1024)]
    [InlineData(2400)]
    public void Text_never_runs_off_the_picture(int width)
    {
        // A skewed map whose scores need several digits, on a disk whose size labels are long.
        var map = new HeatMap(3L << 40, 65536, unitClusters: 1024);
        var rng = new Random(1);
        for (var i = 0; i < 20_000; i++)
        {
            map.RecordRead((long)(Math.Pow(rng.NextDouble(), 4) * (3L << 40)), 65536);
        }
        var png = Png(s => HeatRender.WriteHeatStrip(s, map, [new TierExtent(0, 1L << 40, StorageTier.Ssd), new TierExtent(1L << 40, 2L << 40, StorageTier.Hdd)], width), $"strip-{width}.png");
        png.Width.Should().Be(width);
        InkIn(png, width - HeatRender.Pad + 2, 0, HeatRender.Pad - 2, png.Height).Should().Be(0, "nothing is drawn in the right margin");
        InkIn(png, 0, png.Height - 4, width, 4).Should().Be(0, "nothing is drawn in the bottom margin");
    }

    [Fact]
    public void Without_a_placement_there_is_no_tier_strip()
    {
        var png = Png(s => HeatRender.WriteHeatStrip(s, StripMap(), placement: null, 640), "strip-notier.png");
        var withTiers = Png(s => HeatRender.WriteHeatStrip(s, StripMap(), Placement, 640), "strip-tier-640.png");
        png.Height.Should().BeLessThan(withTiers.Height);
        var layout = HeatRender.LayoutStrip(640, tiers: false);
        var below = layout.HeatY + HeatRender.HeatStripHeight + 4;
        png.Pixel(layout.X0 + 10, below).Should().Be(C(HeatRender.Background), "the axis follows the heat strip directly");
    }

    [Fact]
    public void The_tier_strip_of_a_real_tiered_image_shows_where_its_clusters_are()
    {
        using var dir = new TempDir();
        using var image = QcowImage.Create(dir.File("t.qcow2"), 1 << 20, new QcowCreateOptions { ClusterSize = 4096, Tier = new QcowTierOptions { DataFile = "t.hdd" } });
        image.Write(0, new byte[512 << 10].Select((_, i) => (byte)(i | 1)).ToArray());
        image.MoveToTier(256 << 10, 256 << 10, StorageTier.Hdd);

        var map = StripMap();
        var png = Png(s => HeatRender.WriteHeatStrip(s, map, image, 512), "strip-tiered.png");
        var layout = HeatRender.LayoutStrip(512, tiers: true);
        var ty = layout.TierY + 4;
        png.Pixel(Column(layout, 100 << 10), ty).Should().Be(C(HeatRender.SsdColor));
        png.Pixel(Column(layout, 300 << 10), ty).Should().Be(C(HeatRender.HddColor));
        png.Pixel(Column(layout, 900 << 10), ty).Should().Be(C(HeatRender.UnallocatedColor));
    }

    [Fact]
    public void The_capacity_curve_has_axes_curves_and_labels()
    {
        var report = HeatAnalysis.Analyze(HeatAnalysisTests.SmallMap(), curvePoints: 11);
        var png = Png(s => HeatRender.WriteCapacityCurve(s, report), "curve.png");
        png.Width.Should().Be(800);
        png.Height.Should().Be(500);
        var p = HeatRender.LayoutCurve(800, 500);

        png.Pixel(p.Left - 1, p.Bottom).Should().Be(C(HeatRender.Ink), "the axes meet at the origin");
        png.Pixel(p.X(0.35), p.Y(1.0)).Should().Be(C(HeatRender.IoColor), "with 30 % of the image on SSD all I/O is served");
        bool ColumnHas(double fraction, Rgb color) => Enumerable.Range(p.X(fraction) - 6, 13)
            .Any(x => Enumerable.Range(p.Top, p.Bottom - p.Top).Any(yy => png.Pixel(x, yy) == C(color)));
        ColumnHas(0.15, HeatRender.ReadColor).Should().BeTrue();
        ColumnHas(0.05, HeatRender.WriteColor).Should().BeTrue();
        ColumnHas(0.5, HeatRender.DiagonalColor).Should().BeTrue("the no-skew diagonal");
        png.Pixel(p.X(0.2), p.Y(40 / 48.0)).Should().Be(C(HeatRender.Ink), "the 20 % point is marked");
        InkIn(png, 0, HeatRender.Pad, png.Width, 14).Should().BeGreaterThan(100, "the title is written");
        InkIn(png, HeatRender.Pad, p.Top, 14, p.Bottom - p.Top).Should().BeGreaterThan(100, "the y label is written");
    }

    [Fact]
    public void A_skewed_curve_rises_above_the_diagonal_and_a_uniform_one_follows_it()
    {
        var skewed = HeatAnalysis.Analyze(HeatAnalysisTests.ZipfMap(7));
        var uniform = new HeatMap(1024 * 65536L, 65536);
        var rng = new Random(8);
        for (var i = 0; i < 40_000; i++)
        {
            uniform.RecordRead(rng.Next(1024) * 65536L, 4096);
        }
        var flat = HeatAnalysis.Analyze(uniform);
        var p = HeatRender.LayoutCurve(800, 500);
        int CurveTop(DecodedPng png, double fraction) =>
            Enumerable.Range(p.Top, p.Bottom - p.Top).First(y => png.Pixel(p.X(fraction), y) == C(HeatRender.IoColor));

        var a = Png(s => HeatRender.WriteCapacityCurve(s, skewed), "curve-zipf.png");
        CurveTop(a, 0.1).Should().BeLessThan(p.Y(0.5), "a tenth of the image serves over half the I/O");
        var b = Png(s => HeatRender.WriteCapacityCurve(s, flat), "curve-uniform.png");
        // Sampling alone (about 40 operations a unit) lifts it a little above the diagonal.
        CurveTop(b, 0.5).Should().BeInRange(p.Y(0.62), p.Y(0.5) + 2, "without skew half the image serves about half the I/O");
    }

    [Fact]
    public void A_curve_without_activity_still_draws()
    {
        var report = HeatAnalysis.Analyze(new HeatMap(1 << 20, 4096));
        var png = Png(s => HeatRender.WriteCapacityCurve(s, report, 400, 300), "curve-empty.png");
        var p = HeatRender.LayoutCurve(400, 300);
        png.Pixel(p.Left - 1, p.Bottom).Should().Be(C(HeatRender.Ink));
        png.Rgb.Chunk(3).Should().NotContain(px => px[0] == HeatRender.IoColor.R && px[1] == HeatRender.IoColor.G && px[2] == HeatRender.IoColor.B, "there is no curve to draw");
    }

    [Fact]
    public void Noise_round_trips_through_many_idat_chunks()
    {
        var rng = new Random(3);
        var canvas = new Canvas(300, 200, HeatRender.Background);
        for (var y = 0; y < 200; y++)
        {
            for (var x = 0; x < 300; x++)
            {
                canvas.Set(x, y, new Rgb((byte)rng.Next(256), (byte)rng.Next(256), (byte)rng.Next(256)));
            }
        }
        canvas.Fill(0, 100, 300, 50, HeatRender.Ink); // identical rows: the "Up" filter
        var ms = new MemoryStream();
        PngWriter.Write(ms, canvas);
        var png = DecodedPng.Decode(ms.ToArray());
        png.Chunks.Count(c => c == "IDAT").Should().BeGreaterThan(1, "180 000 random bytes do not fit one 32 KiB chunk");
        for (var y = 0; y < 200; y++)
        {
            for (var x = 0; x < 300; x++)
            {
                png.Pixel(x, y).Should().Be(C(canvas.Get(x, y)));
            }
        }
    }

    [Fact]
    public void Every_glyph_is_drawn_inside_its_cell()
    {
        for (var ch = ' '; ch <= '~'; ch++)
        {
            var glyph = BitmapFont.Glyph(ch);
            glyph.Length.Should().Be(BitmapFont.Height);
            foreach (var row in glyph)
            {
                (row & ~0x1f).Should().Be(0, $"'{ch}' is five pixels wide");
            }
            if (ch != ' ')
            {
                glyph.ToArray().Should().Contain(r => r != 0, $"'{ch}' has ink");
            }
        }
        BitmapFont.Glyph('é').ToArray().Should().Equal(BitmapFont.Glyph('?').ToArray());
    }

    [Fact]
    public void Sizes_out_of_range_are_refused()
    {
        var map = StripMap();
        var act = () => HeatRender.WriteHeatStrip(Stream.Null, map, placement: null, 100);
        act.Should().Throw<ArgumentOutOfRangeException>();
        var act2 = () => HeatRender.WriteCapacityCurve(Stream.Null, HeatAnalysis.Analyze(map), 800, 100_000);
        act2.Should().Throw<ArgumentOutOfRangeException>();
    }
}
